"""Operator benchmark: many ImportRuns in one namespace. Prints numbers; asserts nothing.

    .venv/bin/python bench/operator_bench.py                 # 300 ImportRuns on a fresh local control plane
    .venv/bin/python bench/operator_bench.py --count 50 --kubeconfig ~/.kube/config

Measures, with the operator running as it is deployed (``python -m reflection_operator``, one process):

1. apply → Job: the time from creating an ImportRun to its Job appearing (seen on a watch of Jobs);
2. state change → status: the time from writing an importer summary into an ImportRun's state ConfigMap
   (as the importer does at each checkpoint) to the ImportRun's status.progress showing it (seen on a
   watch of ImportRuns);
3. the operator's RSS once it follows all of them.

The ImportRuns ask for more CPU than any node has, so their Pods stay Pending: the Jobs exist and the
operator does all its work, but no importer process runs (the numbers are the operator's, not the
importer's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml
from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reflection_operator.rbac import importer_rbac  # noqa: E402

from localcluster.cluster import LocalCluster  # noqa: E402

CRD = REPO / "charts" / "reflection-operator" / "crds" / "importruns.reflection.dev.yaml"
GROUP, VERSION, PLURAL = "reflection.dev", "v1alpha1", "importruns"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def describe(name: str, values: list[float]) -> str:
    if not values:
        return f"{name}: no samples"
    return (
        f"{name}: n={len(values)} median={statistics.median(values) * 1000:.0f} ms "
        f"p95={percentile(values, 0.95) * 1000:.0f} ms max={max(values) * 1000:.0f} ms"
    )


class Watcher(threading.Thread):
    """Calls ``on_event(object, time seen)`` for every event of a watch, until stopped."""

    def __init__(self, list_fn: Callable[..., Any], on_event: Callable[[dict[str, Any], float], None], **kwargs: Any):
        super().__init__(daemon=True)
        self.list_fn, self.on_event, self.kwargs = list_fn, on_event, kwargs
        self.watch = watch.Watch()
        self.ready = threading.Event()

    def run(self) -> None:
        self.ready.set()
        try:
            for event in self.watch.stream(self.list_fn, _request_timeout=3600, **self.kwargs):
                self.on_event(event["raw_object"], time.monotonic())
        except Exception:  # the stream ends with the cluster or the benchmark: nothing left to measure
            return

    def stop(self) -> None:
        self.watch.stop()


def importrun(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImportRun",
        "metadata": {"name": name},
        "spec": {
            "source": {"volume": {"emptyDir": {}}},
            "qdrant": {"url": "http://qdrant:6333"},
            # No node has this much CPU: the Pods stay Pending and no importer runs.
            "resources": {"memory": "1Gi", "cpu": "1000"},
        },
    }


def start_operator(kubeconfig: Path, namespace: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "REFLECTION_NAMESPACES": namespace,
        "REFLECTION_METRICS_PORT": "0",
        "REFLECTION_LIVENESS_PORT": "0",
        "REFLECTION_LOG_FORMAT": "json",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "reflection_operator"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def run(api: client.ApiClient, kubeconfig: Path, count: int, workdir: Path) -> None:
    core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
    kubectl_apply(kubeconfig, [yaml.safe_load(CRD.read_text())])
    namespace = f"bench-{int(time.time())}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    kubectl_apply(kubeconfig, importer_rbac(namespace), namespace)

    operator = start_operator(kubeconfig, namespace, workdir / "operator.log")
    process = psutil.Process(operator.pid)
    time.sleep(3)  # kopf's start: login, initial listings
    print(f"operator RSS with no ImportRun: {process.memory_info().rss / 2**20:.0f} MiB", flush=True)

    created: dict[str, float] = {}
    job_seen: dict[str, float] = {}

    def on_job(job: dict[str, Any], seen: float) -> None:
        owner = job["metadata"].get("labels", {}).get("reflection.dev/importrun", "")
        job_seen.setdefault(owner, seen)

    jobs = Watcher(batch.list_namespaced_job, on_job, namespace=namespace)
    jobs.start()
    jobs.ready.wait()
    names = [f"ir-{i:04d}" for i in range(count)]
    started = time.monotonic()
    for name in names:
        created[name] = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, importrun(name))
    print(f"created {count} ImportRuns in {time.monotonic() - started:.1f} s", flush=True)
    deadline = time.monotonic() + 60 + count
    while len(job_seen) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    jobs.stop()
    print(describe("apply -> Job", [job_seen[n] - created[n] for n in names if n in job_seen]), flush=True)
    if len(job_seen) < count:
        print(f"  {count - len(job_seen)} ImportRuns got no Job in time", flush=True)

    time.sleep(5)  # let status writes settle
    rss = process.memory_info().rss
    print(f"operator RSS following {count} ImportRuns: {rss / 2**20:.0f} MiB", flush=True)

    written: dict[str, tuple[float, str]] = {}
    shown: dict[str, float] = {}

    def on_importrun(body: dict[str, Any], seen: float) -> None:
        name = body["metadata"]["name"]
        expected = written.get(name)
        if expected and (body.get("status") or {}).get("progress") == expected[1] and name not in shown:
            shown[name] = seen

    runs = Watcher(
        custom.list_namespaced_custom_object,
        on_importrun,
        group=GROUP,
        version=VERSION,
        namespace=namespace,
        plural=PLURAL,
    )
    runs.start()
    runs.ready.wait()
    time.sleep(1)
    for index, name in enumerate(names):
        done = 1 + index % 99
        summary = {
            "shard-0": {
                "files_total": 100,
                "files_done": done,
                "files_failed": 0,
                "chunks": done * 7,
                "bytes": 0,
                "phase": "Running",
                "updated_at": "",
            }
        }
        written[name] = (time.monotonic(), f"{done}/100")
        core.patch_namespaced_config_map(f"{name}-state-0", namespace, {"data": {"summary": json.dumps(summary)}})
        time.sleep(0.02)
    deadline = time.monotonic() + 60
    while len(shown) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    runs.stop()
    print(describe("state change -> status", [shown[n] - written[n][0] for n in names if n in shown]), flush=True)
    if len(shown) < count:
        print(f"  {count - len(shown)} status changes not seen in time", flush=True)
    print(f"operator RSS at the end: {process.memory_info().rss / 2**20:.0f} MiB", flush=True)

    operator.terminate()
    operator.wait(timeout=60)
    core.delete_namespace(namespace)


def kubectl_apply(kubeconfig: Path, documents: list[dict[str, Any]], namespace: str | None = None) -> None:
    kubectl = LocalCluster(Path(tempfile.gettempdir())).kubectl
    args = [str(kubectl), "--kubeconfig", str(kubeconfig), "apply", "-f", "-"]
    if namespace:
        args += ["-n", namespace]
    subprocess.run(args, input=yaml.safe_dump_all(documents), text=True, check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="ImportRuns (default %(default)s)")
    parser.add_argument("--kubeconfig", type=Path, help="an existing cluster (default: start a local one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="operator-bench-") as tmp:
        workdir = Path(tmp)
        cluster = None
        kubeconfig = args.kubeconfig
        if kubeconfig is None:
            cluster = LocalCluster(workdir / "cluster")
            cluster.start()
            kubeconfig = cluster.kubeconfig
        try:
            api = config.new_client_from_config(config_file=str(kubeconfig))
            run(api, kubeconfig, args.count, workdir)
        finally:
            if cluster is not None:
                cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
