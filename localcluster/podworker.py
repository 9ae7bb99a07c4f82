"""One thread per Pod bound to the test kubelet: runs its containers as local processes, reports their status.

See ``localcluster.kubelet`` for what this kubelet is and is not.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import yaml
from kubernetes.client.exceptions import ApiException

from localcluster import podspec
from localcluster.podspec import ConfigError, PathRewriter
from localcluster.rest import JsonDict, Rest, is_status

log = logging.getLogger(__name__)

MEMORY_POLL_SECONDS = 0.1
CONFIG_RETRY_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 10.0
TERMINATION_LOG_LINES = 80
TERMINATION_LOG_BYTES = 2048
TERMINATION_FILE_BYTES = 4096
OOM_EXIT_CODE = 137
STATUS_ATTEMPTS = 5
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: An embedded Qdrant folder can be opened by one process only: containers naming the same one take turns.
EXCLUSIVE_ENV = "IMPORTER_QDRANT_PATH"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ExclusiveKeys:
    """A lock per key (here: per embedded Qdrant folder), created on first use."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    def lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks[key]


@dataclass
class KubeletContext:
    """What every pod worker needs from the kubelet that owns it."""

    rest: Rest
    node_name: str
    state_dir: Path
    pvc_root: Path
    server: str
    ca_data: str
    venv_bin: Path
    allocatable: dict[str, str]
    exclusive: ExclusiveKeys = field(default_factory=ExclusiveKeys)

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pids"


class StopRequested(Exception):
    """Raised inside a worker when the Pod is being deleted or the kubelet is shutting down."""


@dataclass
class ContainerState:
    """The status of one container, in the shape the API's ContainerStatus expects."""

    name: str
    image: str
    state: JsonDict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JsonDict = field(default_factory=dict)
    restart_count: int = 0
    pid: int = 0

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def exit_code(self) -> int | None:
        terminated = self.state.get("terminated")
        return None if terminated is None else int(terminated["exitCode"])

    def to_status(self) -> JsonDict:
        status: JsonDict = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.running,
            "restartCount": self.restart_count,
            "started": self.running,
        }
        if self.pid:
            status["containerID"] = f"process://{self.pid}"
        return status


class PodWorker(threading.Thread):
    """Runs one Pod: its volumes, its init containers one after the other, then its containers together."""

    def __init__(self, ctx: KubeletContext, pod: JsonDict) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx = ctx
        self.pod = pod
        self.uid: str = meta["uid"]
        self.pod_dir = ctx.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{self.uid}"
        spec = pod["spec"]
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.init_states = [ContainerState(c["name"], c.get("image", "")) for c in spec.get("initContainers") or []]
        self.states = [ContainerState(c["name"], c.get("image", "")) for c in spec["containers"]]
        self.phase = "Pending"
        self.initialized = not self.init_states
        self.start_time = now_rfc3339()
        self._stop_event = threading.Event()
        self._grace_seconds = float(spec.get("terminationGracePeriodSeconds", 30))
        self._report_status = True
        self._status_lock = threading.Lock()
        self._end_lock = threading.Lock()
        self._finished = False
        self._delete_when_done = False
        self._volumes: dict[str, Path] = {}
        self._kubeconfig: Path | None = None

    # -- requests from the kubelet's watch loop ---------------------------------------------------------

    def request_deletion(self, grace_seconds: float | None) -> bool:
        """Stop the Pod's processes, then finish its deletion. False if the worker had already ended."""
        with self._end_lock:
            if self._finished:
                return False
            self._delete_when_done = True
            if grace_seconds is not None:
                self._grace_seconds = grace_seconds
            self._stop_event.set()
            return True

    def shut_down(self, grace_seconds: float) -> None:
        """The kubelet is exiting (or the Pod vanished): stop the processes, report nothing more."""
        self._report_status = False
        self._grace_seconds = min(self._grace_seconds, grace_seconds)
        self._stop_event.set()

    # -- the thread ---------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run_pod()
        except StopRequested:
            pass
        except Exception:
            log.exception("pod %s failed inside the kubelet", self.name)
        with self._end_lock:
            self._finished = True
            delete = self._delete_when_done
        if delete:
            self._publish()
            delete_pod_now(self.ctx.rest, self.pod)

    def _run_pod(self) -> None:
        self.pod_dir.mkdir(parents=True, exist_ok=True)
        self._publish()
        self._with_config_retry(self.init_states[0] if self.init_states else self.states[0], self._prepare_pod)
        specs = self.pod["spec"]
        for container, state in zip(specs.get("initContainers") or [], self.init_states, strict=True):
            if not self._run_until_done(container, state, init=True):
                self._finish("Failed")
                return
        self.initialized = True
        threads = [
            threading.Thread(target=self._run_guarded, args=(c, s), name=f"{self.name}/{c['name']}", daemon=True)
            for c, s in zip(specs["containers"], self.states, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._stop_event.is_set():
            raise StopRequested
        self._finish("Succeeded" if all(s.exit_code == 0 for s in self.states) else "Failed")

    def _finish(self, phase: str) -> None:
        self.phase = phase
        self._publish()
        log.info("pod %s %s", self.name, phase)

    def _prepare_pod(self) -> None:
        ctx = podspec.VolumeContext(self.pod, self.pod_dir, self.ctx.pvc_root, self._lookup)
        self._volumes = podspec.prepare_volumes(ctx)
        self._kubeconfig = self._write_kubeconfig()

    def _run_guarded(self, container: JsonDict, state: ContainerState) -> None:
        try:
            self._run_until_done(container, state, init=False)
        except StopRequested:
            pass
        except Exception:
            log.exception("container %s/%s failed inside the kubelet", self.name, container["name"])
            state.state = {"terminated": _terminated(1, "Error", "the test kubelet failed to run it", now_rfc3339())}
            self._publish()

    def _run_until_done(self, container: JsonDict, state: ContainerState, init: bool) -> bool:
        """Run (and restart, per restartPolicy) one container; True once it has succeeded for good."""
        while True:
            exit_code = self._run_once(container, state)
            if self._stop_event.is_set():
                raise StopRequested
            restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and exit_code != 0)
            if init and exit_code == 0:
                return True
            if not restart:
                return exit_code == 0
            self._back_off(state, exit_code)

    def _back_off(self, state: ContainerState, exit_code: int) -> None:
        delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** min(state.restart_count, 5))
        state.last_state = state.state
        state.restart_count += 1
        if exit_code != 0:
            state.state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off {delay:.1f}s"}}
            self._publish()
        if self._stop_event.wait(delay):
            raise StopRequested

    # -- one run of one container ---------------------------------------------------------------------------

    def _run_once(self, container: JsonDict, state: ContainerState) -> int:
        launch = self._with_config_retry(state, lambda: self._launch_spec(container))
        exclusive = launch.env.get(EXCLUSIVE_ENV)
        lock = self.ctx.exclusive.lock_for(os.path.realpath(exclusive)) if exclusive else None
        if lock is not None and not lock.acquire(blocking=False):
            self._set_waiting(state, "ContainerCreating", f"waiting for another pod using {exclusive}")
            while not lock.acquire(timeout=0.2):
                if self._stop_event.is_set():
                    raise StopRequested
        try:
            return self._supervise(container, state, launch)
        finally:
            if lock is not None:
                lock.release()

    def _supervise(self, container: JsonDict, state: ContainerState, launch: Launch) -> int:
        log_file = self.pod_dir / f"{container['name']}.log"
        log_start = log_file.stat().st_size if log_file.exists() else 0
        launch.termination_file.unlink(missing_ok=True)
        with log_file.open("ab") as out:
            process = subprocess.Popen(
                launch.argv,
                env=launch.env,
                cwd=launch.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so the whole tree can be signalled
            )
        started = now_rfc3339()
        state.pid = process.pid
        self._record_pid(container["name"], process.pid)
        state.state = {"running": {"startedAt": started}}
        self._publish()
        log.info("pod %s container %s started: pid %d", self.name, container["name"], process.pid)
        oom = self._watch(process, podspec.memory_limit_bytes(container))
        self._forget_pid(container["name"])
        exit_code = _exit_code(process.returncode)
        if oom:
            exit_code, reason = OOM_EXIT_CODE, "OOMKilled"
        else:
            reason = "Completed" if exit_code == 0 else "Error"
        message = self._termination_message(container, launch, log_file, log_start, failed=exit_code != 0)
        state.state = {"terminated": _terminated(exit_code, reason, message, now_rfc3339(), started, process.pid)}
        self._publish()
        log.info("pod %s container %s ended: %s (%d)", self.name, container["name"], reason, exit_code)
        return exit_code

    def _watch(self, process: subprocess.Popen[bytes], limit: int | None) -> bool:
        """Wait for the process; kill its tree past the memory limit (True) or when asked to stop."""
        while not _has_exited(process.pid):
            if self._stop_event.is_set():
                _terminate_tree(process, self._grace_seconds)
                return False
            if limit is not None and _tree_rss(process.pid) > limit:
                log.info("pod %s: process %d is over its memory limit of %d bytes", self.name, process.pid, limit)
                _kill_tree(process)
                return True
            self._stop_event.wait(MEMORY_POLL_SECONDS)
        # The exited process is still a zombie, so its group id cannot have been reused yet: clear the group
        # of anything it left behind (daemonised children), then reap it.
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        return False

    def _termination_message(
        self, container: JsonDict, launch: Launch, log_file: Path, log_start: int, failed: bool
    ) -> str:
        message = ""
        if launch.termination_file.is_file():
            message = launch.termination_file.read_bytes()[:TERMINATION_FILE_BYTES].decode(errors="replace")
        if not message and failed and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = _log_tail(log_file, log_start)
        return message

    def _launch_spec(self, container: JsonDict) -> Launch:
        mounts = podspec.container_mounts(container, self._volumes)
        termination_path = container.get("terminationMessagePath") or podspec.DEFAULT_TERMINATION_MESSAGE_PATH
        termination_file = self.pod_dir / f"{container['name']}.termination-log"
        rewriter = PathRewriter({**mounts, termination_path: termination_file})
        pod_env = podspec.container_env(self.pod, container, self._lookup, self.ctx.allocatable)
        env = {name: rewriter.rewrite(value) for name, value in pod_env.items()}
        argv = [
            rewriter.rewrite(podspec.expand_references(part, env))
            for part in (container.get("command") or []) + (container.get("args") or [])
        ]
        if not container.get("command"):
            raise ConfigError("the test kubelet ignores images, so a container needs an explicit command")
        cwd = Path(rewriter.rewrite(container["workingDir"])) if container.get("workingDir") else self.pod_dir
        if not cwd.is_dir():
            raise ConfigError(f"workingDir {cwd} does not exist on this machine")
        return Launch(argv, self._process_env(env), cwd, termination_file)

    def _process_env(self, pod_env: dict[str, str]) -> dict[str, str]:
        """The pod's variables over a small base, with this repo's venv (the "image") first on PATH."""
        env = {
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": self.pod["metadata"]["name"],
            **pod_env,
        }
        env["PATH"] = f"{self.ctx.venv_bin}:{pod_env.get('PATH', SYSTEM_PATH)}"
        if self._kubeconfig is not None and "KUBECONFIG" not in pod_env:
            env["KUBECONFIG"] = str(self._kubeconfig)
        return env

    def _with_config_retry(self, state: ContainerState, action: Any) -> Any:
        """Run ``action`` until the Secrets/ConfigMaps it needs exist, showing the wait in the status."""
        while True:
            try:
                return action()
            except ConfigError as error:
                self._set_waiting(state, "CreateContainerConfigError", str(error))
            except ApiException as error:
                self._set_waiting(state, "CreateContainerConfigError", f"API error {error.status}")
            if self._stop_event.wait(CONFIG_RETRY_SECONDS):
                raise StopRequested

    def _set_waiting(self, state: ContainerState, reason: str, message: str) -> None:
        if state.state.get("waiting", {}).get("message") != message:
            state.state = {"waiting": {"reason": reason, "message": message}}
            self._publish()

    # -- API server conversations --------------------------------------------------------------------------

    def _lookup(self, kind: str, namespace: str, name: str) -> JsonDict | None:
        resource = "secrets" if kind == "Secret" else "configmaps"
        try:
            result: JsonDict = self.ctx.rest.get(f"/api/v1/namespaces/{namespace}/{resource}/{name}")
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return result

    def _write_kubeconfig(self) -> Path | None:
        """A kubeconfig holding the pod's ServiceAccount token, so RBAC applies to what the process does."""
        spec = self.pod["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return None
        token = self._service_account_token(spec.get("serviceAccountName") or "default")
        path = self.pod_dir / "kubeconfig"
        path.write_text(yaml.safe_dump(pod_kubeconfig(self.ctx.server, self.ctx.ca_data, token)))
        path.chmod(0o600)
        return path

    def _service_account_token(self, account: str) -> str:
        namespace = self.pod["metadata"]["namespace"]
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 86400,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": self.pod["metadata"]["name"],
                    "uid": self.uid,
                },
            },
        }
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token"
        try:
            return str(self.ctx.rest.create(path, request)["status"]["token"])
        except ApiException as error:
            if error.status == 404:
                raise ConfigError(f"ServiceAccount {namespace}/{account} not found") from error
            raise

    def _publish(self) -> None:
        """Send the Pod's whole status (a merge patch replaces the container lists as a whole)."""
        if not self._report_status:
            return
        with self._status_lock:
            body = {"status": self._status()}
            meta = self.pod["metadata"]
            path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status"
            for attempt in range(STATUS_ATTEMPTS):
                try:
                    self.ctx.rest.patch(path, body)
                    return
                except ApiException as error:
                    if error.status == 404:  # the Pod is gone (force-deleted): stop its processes
                        self._report_status = False
                        self._stop_event.set()
                        return
                    problem = f"{error.status} {error.body}"
                except Exception as error:  # connection trouble: a lost final status would strand the Pod
                    problem = repr(error)
                log.warning("pod %s: status update %d failed: %s", self.name, attempt + 1, problem)
                time.sleep(0.5 * (attempt + 1))

    def _status(self) -> JsonDict:
        phase = self.phase
        if phase == "Pending" and self.initialized and any(s.pid for s in self.states):
            phase = "Running"  # stays Running while a container restarts or is being stopped
        ready = phase == "Running" and all(s.running for s in self.states)
        when = now_rfc3339()

        def condition(kind: str, value: bool, reason: str | None = None) -> JsonDict:
            item = {"type": kind, "status": "True" if value else "False", "lastTransitionTime": when}
            return {**item, "reason": reason} if reason and not value else item

        done_reason = "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
        return {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": [
                condition("Initialized", self.initialized, "ContainersNotInitialized"),
                condition("Ready", ready, done_reason),
                condition("ContainersReady", ready, done_reason),
                condition("PodScheduled", True),
            ],
            "initContainerStatuses": [s.to_status() for s in self.init_states],
            "containerStatuses": [s.to_status() for s in self.states],
        }

    # -- bookkeeping for `localcluster down` --------------------------------------------------------------

    def _record_pid(self, container: str, pid: int) -> None:
        self.ctx.pid_dir.mkdir(parents=True, exist_ok=True)
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            created = 0.0
        record = {"pid": pid, "create_time": created, "pod": self.name}
        (self.ctx.pid_dir / f"{self.uid}_{container}.json").write_text(json.dumps(record))

    def _forget_pid(self, container: str) -> None:
        (self.ctx.pid_dir / f"{self.uid}_{container}.json").unlink(missing_ok=True)


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    termination_file: Path


def _terminated(
    exit_code: int, reason: str, message: str, finished: str, started: str | None = None, pid: int = 0
) -> JsonDict:
    state: JsonDict = {
        "exitCode": exit_code,
        "reason": reason,
        "finishedAt": finished,
        "startedAt": started or finished,
    }
    if message:
        state["message"] = message
    if pid:
        state["containerID"] = f"process://{pid}"
    return state


def _exit_code(returncode: int) -> int:
    """Like a container runtime: death by signal N is exit code 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _log_tail(log_file: Path, start: int) -> str:
    with log_file.open("rb") as handle:
        handle.seek(start)
        data = handle.read()
    lines = data.decode(errors="replace").splitlines()[-TERMINATION_LOG_LINES:]
    return "\n".join(lines).encode()[-TERMINATION_LOG_BYTES:].decode(errors="ignore")


def _process_tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants (psutil objects notice PID reuse before signalling)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, as a cgroup would count it (roughly)."""
    total = 0
    for process in _process_tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


def _has_exited(pid: int) -> bool:
    """True once the child has exited, without reaping it (WNOWAIT keeps the zombie and its PID)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _signal_all(processes: list[psutil.Process], sig: signal.Signals) -> None:
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.Error:
            continue


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process, its group and its descendants (also those that left the group), then reap it."""
    tree = _process_tree(process.pid)
    _signal_group(process.pid, signal.SIGKILL)
    _signal_all(tree, signal.SIGKILL)
    process.wait()


def _terminate_tree(process: subprocess.Popen[bytes], grace_seconds: float) -> None:
    """SIGTERM, then SIGKILL once the grace period is over: what a kubelet does to a deleted Pod."""
    tree = _process_tree(process.pid)
    _signal_group(process.pid, signal.SIGTERM)
    _signal_all(tree, signal.SIGTERM)
    deadline = time.monotonic() + max(grace_seconds, 0.1)
    while time.monotonic() < deadline and not _has_exited(process.pid):
        time.sleep(0.05)
    tree += _process_tree(process.pid)
    _signal_group(process.pid, signal.SIGKILL)
    _signal_all(tree, signal.SIGKILL)
    process.wait()


def delete_pod_now(rest: Rest, pod: JsonDict) -> None:
    """Finish a graceful deletion once the processes are gone (what the real kubelet does last)."""
    meta = pod["metadata"]
    body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
    try:
        rest.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
    except ApiException as error:
        if not is_status(error, 404, 409):
            log.warning("deleting pod %s/%s failed: %s", meta["namespace"], meta["name"], error.status)


def pod_kubeconfig(server: str, ca_data: str, token: str) -> JsonDict:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority-data": ca_data}}],
        "users": [{"name": "pod", "user": {"token": token}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "pod"}}],
        "current-context": "local",
    }


def encode_ca(ca_pem: bytes) -> str:
    return base64.b64encode(ca_pem).decode()
