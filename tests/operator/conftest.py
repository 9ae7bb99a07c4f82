"""Fixtures for the operator's unit tests: a small simulated world of Jobs and Pods around one ImportRun.

(pytest runs with --import-mode=importlib, so helpers reach the tests as fixtures, not imports.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from reflection_operator.jobs import JobRequest, Owner, build_job
from reflection_operator.observed import JobInfo, PodInfo, job_info, pod_info
from reflection_operator.rbac import importer_rbac
from reflection_operator.reconcile import Observed, Plan, decide
from reflection_operator.settings import Settings
from reflection_operator.spec import parse_spec

from importer.contract import ShardSummary
from tests.importer.stored import embedded_store
from tests.polling import wait_for

T0 = datetime(2026, 1, 5, 10, 0, 0, tzinfo=UTC)
OWNER = Owner(name="nightly", namespace="team", uid="uid-1")


def base_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "source": {"volume": {"persistentVolumeClaim": {"claimName": "claude-logs"}}, "subPath": "projects"},
        "qdrant": {"url": "http://qdrant:6333"},
        "resources": {"memory": "512Mi", "cpu": "1"},
    }
    spec.update(overrides)
    return spec


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class World:
    """What the operator would see of one ImportRun: its spec and status, Jobs, Pods, summary, the time."""

    T0 = T0
    #: A run-once ImportRun's run id: its creation time (30 s before T0).
    RUN0 = str(int((T0 - timedelta(seconds=30)).timestamp()))
    base_spec = staticmethod(base_spec)
    iso = staticmethod(iso)

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        self.settings = Settings()
        self.raw_spec = spec if spec is not None else base_spec()
        self.status: dict[str, Any] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.summary: dict[int, ShardSummary] = {}
        self.now = T0
        self.created = T0 - timedelta(seconds=30)
        self.generation = 1
        self.extra_problems: list[Any] = []
        #: FailedCreate Event messages by Job name (what the controller reads for Jobs without Pods).
        self.pod_refusals: dict[str, str] = {}

    def observe(self) -> Observed:
        spec, problems = parse_spec(self.raw_spec, self.settings)
        return Observed(
            now=self.now,
            owner=OWNER,
            generation=self.generation,
            created=self.created,
            raw_spec=self.raw_spec,
            spec=spec,
            problems=problems + self.extra_problems,
            status=self.status,
            jobs=[job_info(b) for b in self.jobs.values()],
            pods=[pod_info(b) for b in self.pods.values()],
            summary=self.summary,
            settings=self.settings,
            pod_refusals=dict(self.pod_refusals),
        )

    def step(self, apply: bool = True) -> Plan:
        """Decide, and (like the controller) carry the plan out: Jobs appear, deleted Jobs vanish."""
        plan = decide(self.observe())
        if apply:
            for item in plan.create:
                body = build_job(item.spec, item.raw_spec, item.request, self.settings)
                body["metadata"]["uid"] = f"uid-{item.request.name}"
                body["metadata"]["creationTimestamp"] = iso(self.now)
                self.jobs.setdefault(item.request.name, body)
            for name in plan.delete:
                self.jobs.pop(name, None)
                for pod in [p for p, b in self.pods.items() if b["metadata"]["labels"]["job-name"] == name]:
                    del self.pods[pod]
            self.status = plan.status
        return plan

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    # -- what the Job controller and the kubelet would do ---------------------------------------------

    def start_pod(self, job: str) -> str:
        body = self.jobs[job]
        labels = {**body["spec"]["template"]["metadata"]["labels"], "job-name": job}
        name = f"{job}-pod"
        self.pods[name] = {
            "metadata": {"name": name, "labels": labels, "creationTimestamp": iso(self.now)},
            "status": {"phase": "Running", "containerStatuses": [{"name": "importer", "state": {"running": {}}}]},
        }
        body["status"] = {"startTime": iso(self.now), "active": 1}
        return name

    def end_pod(self, job: str, exit_code: int, reason: str = "", message: str = "", pod_status: bool = True) -> None:
        name = f"{job}-pod"
        if name not in self.pods:
            self.start_pod(job)
        if pod_status:
            terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error")}
            if message:
                terminated["message"] = message
            self.pods[name]["status"] = {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [{"name": "importer", "state": {"terminated": terminated}}],
            }
        kind = "Complete" if exit_code == 0 else "Failed"
        condition = {"type": kind, "status": "True", "lastTransitionTime": iso(self.now)}
        if kind == "Failed":
            condition.update(reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit")
        self.jobs[job]["status"] = {"conditions": [condition], "completionTime": iso(self.now)}

    def job_infos(self) -> list[JobInfo]:
        return [job_info(b) for b in self.jobs.values()]

    def pod_infos(self) -> list[PodInfo]:
        return [pod_info(b) for b in self.pods.values()]


def request_for(attempt: int = 1, shard: int = 0, memory: int = 512 << 20, shards: int = 1) -> JobRequest:
    return JobRequest(
        owner=OWNER,
        run_id=str(int(T0.timestamp())),
        scheduled_time=T0,
        attempt=attempt,
        shard=shard,
        shard_count=shards,
        memory=memory,
    )


@pytest.fixture
def make_world() -> type[World]:
    return World


@pytest.fixture(name="request_for")
def request_for_fixture() -> Any:
    return request_for


# -- against the local control plane --------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
MAKE_CORPUS = Path(os.environ.get("REFLECTION_SHARED", REPO.parent / "shared")) / "corpus" / "make_corpus.py"


def _corpus(pod_readable_dir: Callable[[str], Path], files: int) -> tuple[Path, dict[str, Any]]:
    out = pod_readable_dir(f"operator-corpus-{files}") / "projects"
    subprocess.run(
        [sys.executable, str(MAKE_CORPUS), str(out), "--files", str(files), "--profile", "small"],
        check=True,
        capture_output=True,
    )
    return out, json.loads((out / "MANIFEST.json").read_text())


@pytest.fixture(scope="session")
def small_corpus(pod_readable_dir: Callable[[str], Path]) -> tuple[Path, dict[str, Any]]:
    """A generated conversation tree (read-only source for several tests, mounted by the importer's Pods) and
    its manifest."""
    return _corpus(pod_readable_dir, 8)


@pytest.fixture(scope="session")
def forty_file_corpus(pod_readable_dir: Callable[[str], Path]) -> tuple[Path, dict[str, Any]]:
    """A tree more than one embedding window long: a run stopped at its first checkpoint has files left."""
    return _corpus(pod_readable_dir, 40)


class Kubectl:
    """A namespace of the local cluster seen through kubectl, as a person would use it."""

    def __init__(self, cluster: Any, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace

    def run(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = self.cluster.kubectl_run("-n", self.namespace, *args, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result

    def apply(self, *manifests: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("apply", "-f", "-", input=yaml.safe_dump_all(manifests), check=check)

    def get(self, kind: str, name: str | None = None, selector: str | None = None) -> Any:
        args = ["get", kind] + ([name] if name else []) + (["-l", selector] if selector else []) + ["-o", "json"]
        result = self.run(*args, check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        found = json.loads(result.stdout)
        return found if name else found["items"]

    def importrun(self, name: str) -> dict[str, Any]:
        found = self.get("importrun", name)
        assert found is not None, f"ImportRun {name} is gone"
        return found

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.importrun(name).get("status") or {})

    def jobs(self, importrun: str) -> list[dict[str, Any]]:
        return list(self.get("jobs", selector=f"reflection.dev/importrun={importrun}"))

    def events(self, importrun: str) -> list[dict[str, Any]]:
        events = self.get("events")
        return [
            e
            for e in events
            if e["involvedObject"].get("kind") == "ImportRun" and e["involvedObject"].get("name") == importrun
        ]

    def event_reasons(self, importrun: str) -> list[str]:
        return [e["reason"] for e in self.events(importrun)]

    def wait_phase(self, name: str, *phases: str, timeout: float = 180) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") in phases else None

        return dict(wait_for(f"ImportRun {name} phase in {phases}", reached, timeout))

    def release_importruns(self) -> None:
        """Drops kopf's finalizers so that the namespace can go even when no operator runs any more."""
        for item in self.get("importruns") or []:
            self.run(
                "patch",
                "importrun",
                item["metadata"]["name"],
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )


@pytest.fixture
def k8s(kube_cluster: Any, namespace: str, importrun_crd: Path) -> Iterator[Kubectl]:
    """The test's namespace, with the importer's ServiceAccount and Role made the way users make them."""
    kubectl = Kubectl(kube_cluster, namespace)
    kubectl.apply(*importer_rbac(namespace))
    yield kubectl
    kubectl.release_importruns()


@pytest.fixture
def operator_env(kube_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The operator's environment (it runs in this process; its importer Jobs run in their image, which holds
    the model): the cluster's kubeconfig, no listening ports."""
    env = {
        "KUBECONFIG": str(kube_cluster.kubeconfig),
        "REFLECTION_METRICS_PORT": "0",
        "REFLECTION_LIVENESS_PORT": "0",
        "REFLECTION_LOG_FORMAT": "plain",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def run_operator(operator_env: dict[str, str]) -> Callable[..., KopfRunner]:
    """``with run_operator(namespace):`` runs the operator (kopf in a thread) watching that namespace."""

    def start(namespace: str) -> KopfRunner:
        args = ["run", "--standalone", "--namespace", namespace, "-m", "reflection_operator.handlers"]
        return KopfRunner(args, timeout=60)

    return start


def embedded_importrun(name: str, source: Path, **spec: Any) -> dict[str, Any]:
    """An ImportRun over a host folder into an embedded Qdrant on the claim ``qdrant-<name>``."""
    body: dict[str, Any] = {
        "source": {"volume": {"hostPath": {"path": str(source)}}},
        "qdrant": {"path": "store", "volume": {"persistentVolumeClaim": {"claimName": f"qdrant-{name}"}}},
        "resources": {"memory": "1Gi", "cpu": "1"},
    }
    body.update(spec)
    return {"apiVersion": "reflection.dev/v1alpha1", "kind": "ImportRun", "metadata": {"name": name}, "spec": body}


def claim(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }


def qdrant_points(store: Path) -> int:
    """Points in an embedded Qdrant store (read after the importer has closed it)."""
    with embedded_store(store) as opened:
        return sum(opened.count(name) for name in opened.collections())


@pytest.fixture(name="embedded_importrun")
def embedded_importrun_fixture() -> Callable[..., dict[str, Any]]:
    return embedded_importrun


@pytest.fixture(name="claim")
def claim_fixture() -> Callable[[str], dict[str, Any]]:
    return claim


@pytest.fixture(name="qdrant_points")
def qdrant_points_fixture() -> Callable[[Path], int]:
    return qdrant_points
