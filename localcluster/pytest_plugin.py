"""pytest fixtures for tests against the local cluster (registered by tests/conftest.py).

* ``kube_cluster`` (session): one cluster for the whole session: etcd, the API server, the controller-manager,
  the scheduler and a real node (containerd, runc, CNI, kube-proxy, kubelet v1.20.2; the images built from
  the Dockerfile loaded; all built once and cached). It runs in a workdir under /tmp that UID 65532 (the
  images' user) can traverse, since Pods mount its folders (claims, conversation trees) as hostPath volumes.
  It is stopped at the end, also when the session is interrupted (Ctrl-C or SIGTERM: teardown runs; the
  parent's death by SIGKILL: the components get SIGTERM from the kernel via PR_SET_PDEATHSIG).
* ``kube_api`` (session): a ``kubernetes.client.ApiClient`` for the admin kubeconfig.
* ``namespace`` (function): a fresh namespace whose default ServiceAccount can already run Pods; deleted
  after the test.
* ``pod_readable_dir`` (session): makes a folder in the cluster's workdir that the images' user can read,
  for the trees a test mounts into Pods as hostPath volumes (pytest's own tmp_path is private to root).

Tests using any of them are marked ``cluster`` automatically.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from localcluster.cluster import LocalCluster

CLUSTER_FIXTURES = {"kube_cluster", "kube_api", "namespace", "pod_readable_dir"}
#: Building kubelet, kube-proxy and the images the first time happens before this clock starts.
REAL_NODE_START_SECONDS = 300
NAMESPACE_READY_SECONDS = 30


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


def _interrupt_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def _running(cluster: LocalCluster, **start: Any) -> Iterator[None]:
    """Start ``cluster`` and stop it at the end, also when the session is interrupted: SIGTERM would end
    pytest without teardown, so it becomes a KeyboardInterrupt, which pytest unwinds."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    atexit.register(cluster.stop)
    try:
        cluster.start(**start)
        yield
    finally:
        cluster.stop()
        atexit.unregister(cluster.stop)
        if previous in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[LocalCluster]:
    workdir = Path(tempfile.mkdtemp(prefix="reflection-node-"))
    workdir.chmod(0o755)
    cluster = LocalCluster(workdir, die_with_parent=True)
    try:
        with _running(cluster, timeout=REAL_NODE_START_SECONDS):
            yield cluster
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pod_readable_dir(kube_cluster: LocalCluster) -> Callable[[str], Path]:
    """``pod_readable_dir(name)``: a new folder that Pods (UID 65532) can read; make files in it readable
    (0644, as the default umask does)."""

    def make(name: str) -> Path:
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=kube_cluster.workdir / "data"))
        folder.chmod(0o755)
        return folder

    (kube_cluster.workdir / "data").mkdir(mode=0o755, exist_ok=True)
    return make


@pytest.fixture(scope="session")
def kube_api(kube_cluster: LocalCluster) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(kube_cluster.kubeconfig))
    yield api
    api.close()


def _namespace_name(test_name: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-") or "test"
    return f"{base}-{secrets.token_hex(3)}"


def _default_account_has_token(core: client.CoreV1Api, name: str) -> bool:
    try:
        account = core.read_namespaced_service_account("default", name)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return bool(account.secrets)


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kube_api: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(kube_api)
    name = _namespace_name(request.node.name)
    body = client.V1Namespace(
        metadata=client.V1ObjectMeta(name=name, labels={"localcluster.reflection.dev/test": "true"})
    )
    core.create_namespace(body)
    # Pods are refused until the ServiceAccount controllers have made the default account and its token.
    deadline = time.monotonic() + NAMESPACE_READY_SECONDS
    while not _default_account_has_token(core, name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"namespace {name}: no default ServiceAccount token")
        time.sleep(0.1)
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as error:
        if error.status != 404:
            raise
