"""A real Kubernetes node: containerd (CRI) with runc, CNI, kube-proxy and kubelet v1.20.2.

The control plane (:mod:`localcluster.cluster`) starts these after the API server. Everything host-level this
module changes is made here and undone by :meth:`RealNode.teardown`:

* a Linux bridge ``ro-cni0`` with the node's address ``10.244.0.1/24``, made before the API server starts so
  the API server can advertise it as the ``kubernetes`` Service's endpoint (a loopback address is refused)
  and kubelet can use it as the node's InternalIP (``kubectl logs`` dials it);
* kube-proxy's iptables chains (removed with ``kube-proxy --cleanup``);
* containerd's sandboxes' network namespaces (removed by stopping every Pod through kubelet first).

Pods get routes to their own subnet and the Service range only, no default route, and an iptables rule drops
whatever they send out of any other interface: a Pod reaches this machine (the API server through the
``kubernetes`` Service) and other Pods, never another host.

Names: kubelet points the Pods' resolv.conf at a dnsmasq on the node's address, which answers for the
``kubernetes`` Service only (``kubernetes.default.svc[.cluster.local]``, what kopf's in-cluster login dials)
and for nothing outside the cluster; other Services are found through the environment variables kubelet sets
(``<NAME>_SERVICE_HOST``).

One node per machine: the bridge, the iptables chains and the containerd socket are host-wide, so a lock
file under the cache folder keeps a second one from starting.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from localcluster import build, images

log = logging.getLogger(__name__)

NODE_PACKAGES = (
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "conntrack",
    "catatonit",
    "dnsmasq-base",
)
BRIDGE = "ro-cni0"
NODE_IP = "10.244.0.1"
POD_CIDR = "10.244.0.0/24"
CNI_BIN_DIR = Path("/usr/lib/cni")
#: The sandbox ("pause") image: Debian's static catatonit in pause mode (-P), since no registry is reachable.
PAUSE_IMAGE = "localhost/reflection-pause:catatonit"
CATATONIT = Path("/usr/bin/catatonit")
#: Kernel settings the node's parts change: kubelet sets vm/overcommit_memory, vm/panic_on_oom, kernel/panic
#: and kernel/panic_on_oops (or refuses to start with protectKernelDefaults), kube-proxy sets route_localnet,
#: CNI's bridge plugin turns on IP forwarding. Their values before the node started are restored at teardown.
TOUCHED_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
)
#: With forwarding on, a Pod's packets could still leave through another interface: this rule drops them.
NETNS_DIR = Path("/var/run/netns")
IPTABLES_TABLES = ("filter", "nat", "mangle")
ISOLATION_RULE = ("FORWARD", "-s", POD_CIDR, "!", "-o", BRIDGE, "-m", "comment", "--comment", "reflection-node")


@dataclass(frozen=True)
class NodePorts:
    kubelet: int
    kubelet_healthz: int
    proxy_healthz: int
    proxy_metrics: int


def containerd_root() -> Path:
    """containerd's content and snapshots: kept across clusters so the images are imported once per build."""
    return images.cache_dir().parent / "containerd"


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def ensure_network() -> None:
    """The bridge with the node's address (idempotent); CNI's bridge plugin adopts it for the Pods."""
    if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
    addresses = _run("ip", "-o", "-4", "addr", "show", "dev", BRIDGE).stdout
    if f" {NODE_IP}/" not in addresses:
        _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")

    if _run("iptables", "-C", *ISOLATION_RULE, "-j", "DROP", check=False).returncode != 0:
        _run("iptables", "-I", *ISOLATION_RULE, "-j", "DROP")


def remove_network() -> None:
    while _run("iptables", "-D", *ISOLATION_RULE, "-j", "DROP", check=False).returncode == 0:
        pass
    if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        _run("ip", "link", "delete", BRIDGE)


def save_sysctls(record: Path) -> None:
    """Write down the host's values once (a restarted node must not record its own changes as the host's)."""
    if record.exists():
        return
    values = {}
    for key in TOUCHED_SYSCTLS:
        path = Path("/proc/sys") / key
        if path.exists():
            values[key] = path.read_text().strip()
    record.write_text(json.dumps(values, indent=2))


def restore_sysctls(record: Path) -> None:
    if not record.exists():
        return
    for key, value in json.loads(record.read_text()).items():
        path = Path("/proc/sys") / key
        if path.read_text().strip() != value:
            path.write_text(value)
            log.info("restored %s = %s", key, value)
    record.unlink()


def cni_config(workdir: Path) -> dict[str, object]:
    """bridge + host-local (+ portmap), chained with loopback by containerd; no default route, no masquerade."""
    return {
        "cniVersion": "0.4.0",
        "name": "reflection-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,  # the bridge keeps NODE_IP; Pods' routes below point at it
                "isDefaultGateway": False,
                "ipMasq": False,  # nothing leaves the machine, so there is nothing to masquerade
                "hairpinMode": True,  # a Pod reaching itself through a Service
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                    # The Service range only: kube-proxy DNATs it to Pods or to NODE_IP (the API server).
                    "routes": [{"dst": "10.0.0.0/24"}],
                    "dataDir": str(workdir / "cni" / "ipam"),  # not /var/lib/cni: gone with the workdir
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def containerd_config(workdir: Path) -> str:
    """containerd 1.6 (config version 2): CRI with runc (cgroupfs), CNI from Debian, our sandbox image."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{containerd_root() / "root"}"
state = "{workdir / "containerd" / "state"}"
[grpc]
  address = "{socket_path(workdir)}"
[ttrpc]
  address = "{workdir / "containerd" / "ttrpc.sock"}"
[debug]
  level = "warn"
[metrics]
  address = ""
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  enable_selinux = false
  # This machine refuses to lower a process's oom_score_adj (kubelet asks -998 for sandboxes): clamp the
  # value at containerd's own instead of failing every sandbox with "Permission denied".
  restrict_oom_score_adj = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  BinaryName = "/usr/sbin/runc"
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{workdir / "cni" / "net.d"}"
  max_conf_num = 1
"""


def socket_path(workdir: Path) -> Path:
    return workdir / "containerd" / "containerd.sock"


#: The names of the `kubernetes` Service (its ClusterIP is the first of the Service range).
KUBERNETES_SERVICE_NAMES = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
KUBERNETES_SERVICE_IP = "10.0.0.1"


def dns_command(workdir: Path) -> list[str]:
    """dnsmasq on the node's address: the `kubernetes` Service's names, NXDOMAIN for the rest of the cluster."""
    hosts = workdir / "dns" / "hosts"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(f"{KUBERNETES_SERVICE_IP} {' '.join(KUBERNETES_SERVICE_NAMES)}\n")
    hosts.chmod(0o644)
    return [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",  # not the machine's /etc/dnsmasq.conf
        "--no-resolv",  # nothing is forwarded: Pods need no outside names
        "--no-hosts",
        f"--addn-hosts={hosts}",
        f"--listen-address={NODE_IP}",
        "--bind-interfaces",  # only the bridge's address, whatever else listens on port 53 here
        "--local=/cluster.local/",
        f"--pid-file={workdir / 'dns' / 'dnsmasq.pid'}",
        "--log-facility=-",
    ]


def kubelet_config(workdir: Path, ca_cert: Path, ports: NodePorts) -> dict[str, object]:
    """The KubeletConfiguration. Each setting this sandbox needs says why."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,  # the API server dials it for logs; not on the machine's own network
        "port": ports.kubelet,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports.kubelet_healthz,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_cert)},  # the API server's kubelet-client certificate
        },
        "authorization": {"mode": "Webhook"},
        # No systemd runs here (PID 1 is not systemd): cgroupfs, as containerd's runc (SystemdCgroup=false).
        "cgroupDriver": "cgroupfs",
        # Swap is off on these machines today; a machine with swap must not stop the node from starting.
        "failSwapOn": False,
        # The disk and memory are shared with other sessions: kubelet's defaults (10 % disk, 100 Mi memory)
        # would evict test Pods because of someone else's files; evict only when the machine is really full.
        "evictionHard": {"memory.available": "20Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        # Nothing may delete the images we built (no registry to pull them back from).
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # The whole machine is the sandbox's, other sessions included: reserve nothing, enforce nothing at
        # the node level, but keep the QoS cgroups so each container's memory limit is the kernel's.
        "enforceNodeAllocatable": [],
        "cgroupsPerQOS": True,
        "cgroupRoot": "/",
        # The kernel's sysctls are the host's; kubelet must not insist on its preferred values.
        "protectKernelDefaults": False,
        "makeIPTablesUtilChains": True,
        "serializeImagePulls": False,
        "clusterDomain": "cluster.local",
        "clusterDNS": [NODE_IP],  # the dnsmasq of dns_command()
        "resolvConf": "/etc/resolv.conf",
        "staticPodPath": "",
        "volumePluginDir": str(workdir / "kubelet-root" / "plugins-exec"),
        "nodeStatusUpdateFrequency": "4s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "runtimeRequestTimeout": "4m",
    }


class RealNode:
    """The node's processes are spawned by the cluster (recorded with its PIDs); this builds their commands."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.bin_dir = build.bin_dir(build.NODE_BINARIES)

    @property
    def socket(self) -> Path:
        return socket_path(self.workdir)

    @property
    def netns_record(self) -> Path:
        """The network namespaces that existed before the node (the ones it leaves behind are its own)."""
        return self.workdir / "host-netns.json"

    @property
    def sysctl_record(self) -> Path:
        return self.workdir / "host-sysctls.json"

    def prepare(self) -> list[images.BuiltImage]:
        """Install the Debian packages, build kubelet/kube-proxy and the images (all cached), set up the bridge."""
        build.ensure_packages(NODE_PACKAGES)
        build.ensure_built(build.NODE_BINARIES)
        built = images.build_images()
        save_sysctls(self.sysctl_record)
        if not self.netns_record.exists():
            self.netns_record.write_text(json.dumps(_netns_names()))
        ensure_network()
        for sub in ("containerd", "cni/net.d", "kubelet-root", "kube-proxy"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "cni" / "net.d" / "10-reflection.conflist").write_text(
            json.dumps(cni_config(self.workdir), indent=2)
        )
        (self.workdir / "containerd" / "config.toml").write_text(containerd_config(self.workdir))
        return built

    def containerd_command(self) -> list[str]:
        return ["containerd", "--config", str(self.workdir / "containerd" / "config.toml")]

    def wait_containerd(self, deadline: float) -> None:
        while self.ctr("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("containerd did not answer in time")
            time.sleep(0.2)

    def load_images(self, built: list[images.BuiltImage]) -> None:
        """Import the project's images and the sandbox image into the k8s.io namespace, unless already there.

        containerd's root is kept across clusters, so a record of what was imported (image IDs) saves the
        import when the images did not change.
        """
        record = containerd_root() / "imported.json"
        imported = json.loads(record.read_text()) if record.exists() else {}
        present = set(self.ctr("-n", "k8s.io", "images", "ls", "-q").stdout.split())
        if PAUSE_IMAGE not in present:
            self._import_pause_image()
        for image in built:
            ref = f"docker.io/library/{image.name}"
            if ref not in present or imported.get(ref) != image.image_id:
                self.ctr("-n", "k8s.io", "images", "import", str(image.archive))
                imported[ref] = image.image_id
        record.write_text(json.dumps(imported, indent=2))

    def _import_pause_image(self) -> None:
        """An image holding only catatonit, committed with buildah and imported like the others."""
        container = images.buildah("from", "scratch", capture=True)
        try:
            images.buildah("copy", container, str(CATATONIT), "/catatonit")
            images.buildah("config", "--entrypoint", '["/catatonit", "-P"]', "--user", "65535:65535", container)
            images.buildah("commit", "--rm", container, PAUSE_IMAGE)
        except BaseException:
            images.buildah("rm", container)
            raise
        archive = images.cache_dir() / "archives" / "pause.tar"
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.unlink(missing_ok=True)
        images.buildah("push", PAUSE_IMAGE, f"docker-archive:{archive}:{PAUSE_IMAGE}")
        self.ctr("-n", "k8s.io", "images", "import", str(archive))

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ctr", "--address", str(self.socket), *args, check=check)

    def running_containers(self) -> list[str]:
        """IDs of the containers containerd runs a task for in the k8s.io namespace (sandboxes included)."""
        tasks = self.ctr("-n", "k8s.io", "tasks", "ls", "-q", check=False).stdout.split()
        return tasks

    def kill_all_containers(self) -> None:
        """Kill and remove every container of the k8s.io namespace (when kubelet could not stop them)."""
        for task in self.running_containers():
            self.ctr("-n", "k8s.io", "tasks", "kill", "--signal", "SIGKILL", task, check=False)
        deadline = time.monotonic() + 20
        while self.running_containers() and time.monotonic() < deadline:
            for task in self.running_containers():
                self.ctr("-n", "k8s.io", "tasks", "delete", "--force", task, check=False)
            time.sleep(0.5)
        containers = self.ctr("-n", "k8s.io", "containers", "ls", "-q", check=False).stdout.split()
        if containers:
            self.ctr("-n", "k8s.io", "containers", "rm", *containers, check=False)

    def kubelet_command(self, kubeconfig: Path, ca_cert: Path, node_name: str, ports: NodePorts) -> list[str]:
        config = self.workdir / "kubelet-config.yaml"
        config.write_text(yaml.safe_dump(kubelet_config(self.workdir, ca_cert, ports), sort_keys=False))
        return [
            str(self.bin_dir / "kubelet"),
            f"--config={config}",
            f"--kubeconfig={kubeconfig}",
            "--container-runtime=remote",
            f"--container-runtime-endpoint=unix://{self.socket}",
            f"--root-dir={self.workdir / 'kubelet-root'}",
            f"--cert-dir={self.workdir / 'kubelet-certs'}",
            f"--hostname-override={node_name}",
            f"--node-ip={NODE_IP}",  # the bridge: kubelet refuses a loopback node IP
            "--register-node=true",
            "--v=1",
        ]

    def kube_proxy_command(self, kubeconfig: Path, node_name: str, ports: NodePorts) -> list[str]:
        return [
            str(self.bin_dir / "kube-proxy"),
            f"--kubeconfig={kubeconfig}",
            "--proxy-mode=iptables",
            f"--cluster-cidr={POD_CIDR}",
            f"--hostname-override={node_name}",
            f"--bind-address={NODE_IP}",
            f"--healthz-bind-address=127.0.0.1:{ports.proxy_healthz}",
            f"--metrics-bind-address=127.0.0.1:{ports.proxy_metrics}",
            # conntrack's table size is the host's business (and read-only in some sandboxes): leave it.
            "--conntrack-max-per-core=0",
            "--v=1",
        ]

    def teardown(self) -> None:
        """Undo the host-level changes: iptables chains, the bridge, kernel settings, leftover mounts."""
        proxy = self.bin_dir / "kube-proxy"
        if proxy.exists():
            _run(str(proxy), "--cleanup", "--proxy-mode=iptables", check=False)
        _remove_kube_chains()  # kubelet's own (KUBE-FIREWALL, KUBE-MARK-*, canaries): no --cleanup for those
        remove_network()
        restore_sysctls(self.sysctl_record)
        self._remove_leftover_netns()
        state = self.workdir / "containerd" / "state"
        if state.exists():
            _unmount_below(state)
            shutil.rmtree(state, ignore_errors=True)
        _unmount_below(self.workdir / "kubelet-root")

    def _remove_leftover_netns(self) -> None:
        """Sandboxes' namespaces containerd could not remove (it was stopped before kubelet tore them down)."""
        if not self.netns_record.exists():
            return
        before = set(json.loads(self.netns_record.read_text()))
        for name in set(_netns_names()) - before:
            if name.startswith("cni-"):
                _run("umount", str(NETNS_DIR / name), check=False)
                (NETNS_DIR / name).unlink(missing_ok=True)
        self.netns_record.unlink()


def _netns_names() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []


def _remove_kube_chains() -> None:
    """Delete the rules that jump to KUBE-* chains, then the chains (kubelet and kube-proxy made them)."""
    for table in IPTABLES_TABLES:
        rules = _run("iptables", "-t", table, "-S", check=False).stdout.splitlines()
        for rule in rules:
            parts = rule.split()
            if parts[:1] == ["-A"] and not parts[1].startswith("KUBE-") and "KUBE-" in rule.split(" -j ")[-1]:
                _run("iptables", "-t", table, "-D", *parts[1:], check=False)
        chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
        for chain in chains:
            _run("iptables", "-t", table, "-F", chain, check=False)
        for chain in chains:
            _run("iptables", "-t", table, "-X", chain, check=False)


def _unmount_below(path: Path) -> None:
    """Unmount whatever is still mounted below ``path`` (deepest first), e.g. after containerd was killed."""
    root = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        targets = [t for line in mounts if (t := line.split()[1]) == root or t.startswith(root + os.sep)]
    for target in sorted(targets, key=len, reverse=True):
        _run("umount", "-l", target, check=False)
