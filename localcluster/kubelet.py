"""A test kubelet: runs the Pods bound to its Node as plain local processes. It is NOT a real kubelet.

There is no container runtime on this machine, so this stand-in does the part of a kubelet's job that the
tests need, honestly and no more:

* it registers a Ready Node (nominal capacity: the processes share this machine), renews its Lease and
  plays the external provisioner of a default StorageClass (``localcluster.provisioner``);
* it runs each bound Pod's containers as local processes (``localcluster.podworker``): ``command``/``args``,
  ``env``/``envFrom`` (values, Secret and ConfigMap keys, the downward API's ``fieldRef`` and
  ``resourceFieldRef``), ``workingDir`` and volume mounts mapped to local folders. The image is ignored: the
  command runs with this repository's ``.venv/bin`` first on ``PATH`` (``make setup`` installs the project
  there, so ``python -m importer`` and the console scripts work) and the host's ``HOME``.
  The process sees the host's file system, so each mount path (longest first) is rewritten into its local
  folder inside the command, args, env values and workingDir;
* it enforces ``resources.limits.memory`` from the outside, the way the kernel's OOM killer would: it samples
  the process tree's RSS every 100 ms and, past the limit, kills it and reports ``OOMKilled`` (exit 137);
* it reports phase, conditions and container statuses (with ``FallbackToLogsOnError`` termination
  messages), keeps each container's output in ``<workdir>/kubelet/pods/<ns>_<pod>_<uid>/<container>.log``,
  restarts containers per ``restartPolicy`` with a small back-off, and stops what it started when a Pod is
  deleted (SIGTERM, then SIGKILL after the grace period);
* the process gets a kubeconfig holding the Pod's ServiceAccount token (``KUBECONFIG``), so RBAC applies.

Not done: isolation of any kind (network, PID, file system, CPU), images, probes (a running container counts
as ready), ``kubectl logs``/``exec`` (no kubelet API), ports, ephemeral containers, static pods.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import psutil
import yaml
from kubernetes.client.exceptions import ApiException

from localcluster.podworker import KubeletContext, PodWorker, delete_pod_now
from localcluster.provisioner import FolderProvisioner, ensure_storage_class
from localcluster.rest import JsonDict, Rest, is_status

log = logging.getLogger("localcluster.kubelet")

LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10
STATUS_EVERY_HEARTBEATS = 3
SHUTDOWN_GRACE_SECONDS = 5.0
TERMINAL_PHASES = ("Succeeded", "Failed")


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    def __init__(self, ctx: KubeletContext, cpu: str) -> None:
        self.ctx = ctx
        self.rest = ctx.rest
        self.node = ctx.node_name
        self.cpu = cpu
        self.stop = threading.Event()
        self.workers: dict[str, PodWorker] = {}
        self._workers_lock = threading.Lock()

    # -- the Node and its heartbeat ------------------------------------------------------------------------

    def register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node,
                "labels": {
                    "kubernetes.io/hostname": self.node,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "localcluster.reflection.dev/test-kubelet": "true",
                },
            },
        }
        try:
            self.rest.create("/api/v1/nodes", body)
        except ApiException as error:
            if not is_status(error, 409):
                raise
        self.rest.patch(f"/api/v1/nodes/{self.node}/status", {"status": self._node_status()})
        # The TaintNodesByCondition admission plugin adds not-ready:NoSchedule at creation; the Node is
        # Ready now, so drop it rather than wait for the node lifecycle controller's next pass.
        self.rest.patch(f"/api/v1/nodes/{self.node}", {"spec": {"taints": None}})
        log.info("node %s registered and Ready", self.node)

    def _node_status(self) -> JsonDict:
        now = _time()
        resources = {"cpu": self.cpu, "memory": str(psutil.virtual_memory().total), "pods": "110"}
        resources["ephemeral-storage"] = str(psutil.disk_usage(str(self.ctx.state_dir)).total)
        conditions = [
            ("Ready", "True", "KubeletReady", "test kubelet (local processes) is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
            ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
        ]
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                {
                    "type": kind,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for kind, status, reason, message in conditions
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": platform.release(),
                "osImage": "localcluster test kubelet",
                "containerRuntimeVersion": "local-process://0",
                "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def heartbeat_forever(self) -> None:
        beats = 0
        while not self.stop.is_set():
            try:
                self._renew_lease()
                if beats % STATUS_EVERY_HEARTBEATS == 0:
                    self.rest.patch(f"/api/v1/nodes/{self.node}/status", {"status": self._node_status()})
            except Exception as error:
                log.warning("heartbeat failed: %s", error)
            beats += 1
            self.stop.wait(HEARTBEAT_SECONDS)

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        spec = {
            "holderIdentity": self.node,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": _micro_time(),
        }
        try:
            self.rest.patch(path, {"spec": spec})
        except ApiException as error:
            if not is_status(error, 404):
                raise
            lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": self.node}}
            self.rest.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {**lease, "spec": spec})

    # -- the Pods bound to this Node -------------------------------------------------------------------------

    def watch_pods_forever(self) -> None:
        selector = {"fieldSelector": f"spec.nodeName={self.node}"}
        while not self.stop.is_set():
            try:
                listing = self.rest.get("/api/v1/pods", selector)
                self._resync(listing["items"])
                version = listing["metadata"]["resourceVersion"]
                while not self.stop.is_set():
                    version = self._watch_from(selector, version)
            except Exception as error:
                if not self.stop.is_set():
                    log.warning("pod watch restarts after: %s", error)
                    self.stop.wait(1)

    def _watch_from(self, selector: dict[str, str], version: str) -> str:
        """Follow one watch request; return the last resourceVersion seen (raises on 410 Gone)."""
        for kind, obj in self.rest.watch("/api/v1/pods", {**selector, "resourceVersion": version}):
            if kind == "ERROR":
                raise RuntimeError(f"watch error: {obj.get('message')}")
            version = obj["metadata"]["resourceVersion"]
            if kind == "DELETED":
                self._forget(obj["metadata"]["uid"])
            elif kind in ("ADDED", "MODIFIED"):
                self._handle(obj)
        return version

    def _resync(self, pods: list[JsonDict]) -> None:
        present = {pod["metadata"]["uid"] for pod in pods}
        with self._workers_lock:
            gone = [uid for uid in self.workers if uid not in present]
        for uid in gone:
            self._forget(uid)
        for pod in pods:
            self._handle(pod)

    def _handle(self, pod: JsonDict) -> None:
        meta = pod["metadata"]
        with self._workers_lock:
            worker = self.workers.get(meta["uid"])
        if "deletionTimestamp" in meta:
            grace = meta.get("deletionGracePeriodSeconds")
            if worker is None or not worker.request_deletion(None if grace is None else float(grace)):
                delete_pod_now(self.rest, pod)
            return
        if worker is not None or pod.get("status", {}).get("phase") in TERMINAL_PHASES:
            return
        if self._ran_before(pod):
            return
        worker = PodWorker(self.ctx, pod)
        with self._workers_lock:
            self.workers[meta["uid"]] = worker
        worker.start()

    def _ran_before(self, pod: JsonDict) -> bool:
        """A Pod an earlier kubelet process started: its processes are gone; fail it if it may not restart."""
        statuses = pod.get("status", {}).get("containerStatuses") or []
        started = any("waiting" not in (s.get("state") or {"waiting": {}}) for s in statuses)
        if not started or pod["spec"].get("restartPolicy", "Always") != "Never":
            return False
        meta = pod["metadata"]
        status = {"phase": "Failed", "reason": "KubeletRestarted", "message": "the test kubelet restarted"}
        self.rest.patch(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", {"status": status})
        return True

    def _forget(self, uid: str) -> None:
        with self._workers_lock:
            worker = self.workers.pop(uid, None)
        if worker is not None:
            worker.shut_down(SHUTDOWN_GRACE_SECONDS)

    def shut_down(self) -> None:
        """Stop every process this kubelet started (their Pods keep their last reported status)."""
        self.stop.set()
        with self._workers_lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.shut_down(SHUTDOWN_GRACE_SECONDS)
        for worker in workers:
            worker.join(SHUTDOWN_GRACE_SECONDS + 5)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m localcluster.kubelet", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True, help="the cluster's workdir")
    parser.add_argument("--node-name", default="localcluster-node")
    parser.add_argument("--cpu", default="16", help="nominal CPU capacity to advertise")
    parser.add_argument("--repo-root", type=Path, default=Path(__file__).resolve().parent.parent)
    return parser.parse_args(argv)


def build_context(args: argparse.Namespace) -> KubeletContext:
    config = yaml.safe_load(args.kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    repo_root = args.repo_root.resolve()
    return KubeletContext(
        rest=Rest(args.kubeconfig),
        node_name=args.node_name,
        state_dir=args.workdir / "kubelet",
        pvc_root=args.workdir / "pvc",
        server=cluster["server"],
        ca_data=cluster["certificate-authority-data"],
        venv_bin=repo_root / ".venv" / "bin",
        allocatable={"cpu": args.cpu, "memory": str(psutil.virtual_memory().total)},
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    ctx = build_context(args)
    ctx.state_dir.mkdir(parents=True, exist_ok=True)
    kubelet = Kubelet(ctx, args.cpu)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    kubelet.register()
    ensure_storage_class(ctx.rest)
    threading.Thread(target=kubelet.heartbeat_forever, name="heartbeat", daemon=True).start()
    threading.Thread(target=kubelet.watch_pods_forever, name="pod-watch", daemon=True).start()
    FolderProvisioner(ctx.rest, ctx.pvc_root, kubelet.stop).start()
    (ctx.state_dir / "ready").write_text(str(os.getpid()))
    done.wait()
    log.info("shutting down: stopping the pods' processes")
    kubelet.shut_down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
