"""End to end on a real node: kubelet v1.20.2, containerd, runc, CNI and kube-proxy, with the two images built
from the project's Dockerfile (``kube_cluster``): the operator too runs in its container here.

Nothing here runs as a local process of the test: the operator and the importer run in their containers, as
UID 65532 on read-only root filesystems, reach the API server through the ``kubernetes`` Service with their
mounted ServiceAccount tokens, and the kernel enforces their memory limits.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.importer.stored import stored_points

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "reflection-operator"
MAKE_CORPUS = Path(os.environ.get("REFLECTION_SHARED", REPO.parent / "shared")) / "corpus" / "make_corpus.py"
RELEASE = "ro"
OPERATOR_PODS = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
IMAGE_USER = 65532


def wait_for(what: str, check: Callable[[], Any], timeout: float = 180, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


class Cluster:
    """kubectl and helm against the real node's cluster, in one namespace."""

    def __init__(self, cluster: Any, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        result = self.cluster.kubectl_run("-n", self.namespace, *args, input=input, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
        return str(result.stdout)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def helm(self, *args: str) -> str:
        result = subprocess.run(
            [str(self.cluster.helm), *args, "--namespace", self.namespace],
            capture_output=True,
            text=True,
            env=self.cluster.helm_env(),
            timeout=400,
            check=False,
        )
        assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr}"
        return result.stdout

    def status(self, importrun: str) -> dict[str, Any]:
        return dict(self.json("get", "importrun", importrun).get("status") or {})

    def wait_phase(self, importrun: str, *phases: str, timeout: float = 400) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(importrun)
            return status if status.get("phase") in phases else None

        return dict(wait_for(f"ImportRun {importrun} in {phases}", reached, timeout))

    def jobs(self, importrun: str) -> list[dict[str, Any]]:
        return list(self.json("get", "jobs", "-l", f"reflection.dev/importrun={importrun}")["items"])

    def pods(self, selector: str) -> list[dict[str, Any]]:
        return list(self.json("get", "pods", "-l", selector)["items"])


@pytest.fixture
def ns(kube_cluster: Any) -> Iterator[Cluster]:
    name = f"e2e-{secrets.token_hex(3)}"
    kube_cluster.kubectl_run("create", "namespace", name, check=True)
    wait_for(
        "the default ServiceAccount's token",
        lambda: "default-token" in kube_cluster.kubectl_run("-n", name, "get", "secrets").stdout,
        60,
    )
    yield Cluster(kube_cluster, name)
    for item in json.loads(kube_cluster.kubectl_run("-n", name, "get", "importruns", "-o", "json").stdout or "{}").get(
        "items", []
    ):
        kube_cluster.kubectl_run(
            "-n", name, "patch", "importrun", item["metadata"]["name"], "--type=merge",
            "-p", '{"metadata":{"finalizers":null}}',
        )  # fmt: skip
    kube_cluster.kubectl_run("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def corpus(pod_readable_dir: Callable[[str], Path]) -> tuple[Path, dict[str, Any]]:
    """A generated conversation tree that Pods can read and its manifest."""
    out = pod_readable_dir("e2e-corpus") / "projects"
    subprocess.run(
        [sys.executable, str(MAKE_CORPUS), str(out), "--files", "6", "--profile", "small"],
        check=True,
        capture_output=True,
    )
    for folder in (out, *[p for p in out.rglob("*") if p.is_dir()]):
        folder.chmod(0o755)
    return out, json.loads((out / "MANIFEST.json").read_text())


@pytest.fixture
def installed(ns: Cluster) -> Iterator[Cluster]:
    """The chart installed from the working tree with its default images (the ones built for the node)."""
    ns.helm(
        "install", RELEASE, str(CHART), "--set", "scope=namespace", "--wait", "--timeout", "300s",
    )  # fmt: skip
    yield ns
    ns.helm("uninstall", RELEASE, "--wait", "--timeout", "120s")


def embedded_importrun(name: str, source: Path, **spec: Any) -> list[dict[str, Any]]:
    """An ImportRun over a hostPath tree into an embedded Qdrant on a claim of the folder provisioner."""
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"qdrant-{name}"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    body: dict[str, Any] = {
        "source": {"volume": {"hostPath": {"path": str(source)}}},
        "qdrant": {"path": "store", "volume": {"persistentVolumeClaim": {"claimName": f"qdrant-{name}"}}},
        "resources": {"memory": "1Gi", "cpu": "1"},
    }
    body.update(spec)
    run = {"apiVersion": "reflection.dev/v1alpha1", "kind": "ImportRun", "metadata": {"name": name}, "spec": body}
    return [claim, run]


def stored_messages(store: Path) -> tuple[int, int]:
    """(messages, duplicated chunks) in an embedded Qdrant store, read after the importer closed it."""
    messages, seen, duplicates = 0, set(), 0
    for points in stored_points(store).values():
        for point in points:
            key = (point.payload["conversation_id"], point.payload["chunk_index"])
            duplicates += key in seen
            seen.add(key)
            messages += int(point.payload["message_count"])
    return messages, duplicates


def import_ended(ns: Cluster, pod: str) -> dict[str, Any]:
    """The importer's "import ended" log record (what that attempt's process did), read with kubectl logs."""
    records = [json.loads(line) for line in ns.kubectl("logs", pod).splitlines() if line.startswith("{")]
    ended: dict[str, Any] = next(record for record in records if record.get("message") == "import ended")
    return ended


def container_pid(kube_cluster: Any, pod: dict[str, Any]) -> int:
    """The host PID of the Pod's first container, as containerd reports it."""
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    tasks = kube_cluster.node.ctr("-n", "k8s.io", "tasks", "ls").stdout.splitlines()
    row = next(line.split() for line in tasks if line.startswith(container_id))
    return int(row[1])


def test_helm_install_runs_the_operator_and_an_importrun_in_real_containers(
    kube_cluster: Any, installed: Cluster, corpus: tuple[Path, dict[str, Any]]
) -> None:
    ns = installed
    (pod,) = ns.pods(OPERATOR_PODS)
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True", pod["status"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "reflection-operator:0.1.0" and container["livenessProbe"]["httpGet"]
    # What the kernel says about the operator's process: its user and its root filesystem.
    pid = container_pid(kube_cluster, pod)
    uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    assert uids.split()[1:] == [str(IMAGE_USER)] * 4, uids
    root_mount = next(
        line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines() if line.split()[4] == "/"
    )
    assert "ro" in root_mount[5].split(","), root_mount

    source, manifest = corpus
    ns.apply(*embedded_importrun("logs", source))
    status = ns.wait_phase("logs", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    assert status["filesDone"] == status["filesTotal"] == len(manifest["entries"]), status
    messages, duplicates = stored_messages(kube_cluster.pvc_dir(ns.namespace, "qdrant-logs") / "store")
    assert (messages, duplicates) == (manifest["text_messages"], 0)

    (job,) = ns.jobs("logs")
    importer_pods = ns.pods(f"job-name={job['metadata']['name']}")
    assert importer_pods and importer_pods[0]["status"]["phase"] == "Succeeded"
    # kubectl logs reaches the real kubelet: the importer's log records (JSON, one per line) and its summary.
    # (The Job does not ask for the JSON summary, so that last line is the plain one.)
    lines = [line for line in ns.kubectl("logs", importer_pods[0]["metadata"]["name"]).splitlines() if line]
    files = len(manifest["entries"])
    assert lines[-1].startswith(f"imported {files} files (0 unchanged, 0 failed)"), lines
    records = [json.loads(line) for line in lines[:-1]]
    assert [r["message"] for r in records if r["name"] == "importer.runner"] == ["import started", "import ended"]
    (ended,) = [r for r in records if r["message"] == "import ended"]
    assert (ended["files"], ended["messages"]) == (files, manifest["text_messages"]), ended


def test_deleting_an_importrun_mid_run_leaves_no_container(
    kube_cluster: Any, installed: Cluster, corpus: tuple[Path, dict[str, Any]]
) -> None:
    ns = installed
    source, _ = corpus
    ns.apply(*embedded_importrun("gone", source))

    def running_importer() -> dict[str, Any] | None:
        for pod in ns.pods("reflection.dev/importrun=gone"):
            if "running" in (pod["status"].get("containerStatuses") or [{}])[0].get("state", {}):
                return pod
        return None

    pod = wait_for("the importer container to run", running_importer, 300)
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    assert container_id in kube_cluster.node.running_containers()
    ns.kubectl("delete", "importrun", "gone", "--timeout=120s")
    wait_for("the importer Pod to go", lambda: not ns.pods("reflection.dev/importrun=gone"), 120)
    wait_for(
        "containerd to have no importer container",
        lambda: container_id not in kube_cluster.node.running_containers(),
        60,
    )
    listed = kube_cluster.node.ctr("-n", "k8s.io", "containers", "ls", "-q").stdout.split()
    assert container_id not in listed


def test_a_restarted_operator_adopts_the_running_job(
    kube_cluster: Any, installed: Cluster, corpus: tuple[Path, dict[str, Any]]
) -> None:
    ns = installed
    source, manifest = corpus
    ns.apply(*embedded_importrun("adopt", source))
    wait_for("the importer Job", lambda: ns.jobs("adopt"), 120)
    ns.kubectl("delete", "pod", "-l", OPERATOR_PODS, "--wait=true", "--timeout=120s")
    status = ns.wait_phase("adopt", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    assert len(ns.jobs("adopt")) == 1
    messages, duplicates = stored_messages(kube_cluster.pvc_dir(ns.namespace, "qdrant-adopt") / "store")
    assert (messages, duplicates) == (manifest["text_messages"], 0)


#: The OOM test's memory limit, halfway between two peaks of the container's memory cgroup measured at 1 GiB on
#: the real node with a batch budget of 8 x 256 tokens: 402 MiB importing the small corpus (the model loaded,
#: page cache included) and 631 MiB with the large record below. So the first files are imported, and the
#: kernel kills the importer while it parses that record.
OOM_LIMIT = "512Mi"
#: Short messages (one chunk each) between the first file and the large record: more chunks than the pipeline
#: holds in flight (2 x 128 queued for embedding, a window being embedded, 2 queued for upserting, one being
#: upserted: at most 768), so when the reader reaches the large record the first file has been written and
#: acknowledged, and the first acknowledgement always saves the state.
FILLER_MESSAGES = 1000
#: orjson makes a Python list (~72 bytes) of every "[]" (3 bytes): a line just under the importer's 8 MiB
#: line limit costs ~200 MB while it is parsed, then is freed (the record has no text to import).
LARGE_RECORD_BYTES = (8 << 20) - 4096


def _record(kind: str, content: Any, index: int) -> str:
    return json.dumps(
        {
            "type": kind,
            "sessionId": "large-session",
            "cwd": "/home/dev/projects/zz-large",
            "timestamp": f"2026-03-18T08:{index // 60 % 60:02d}:{index % 60:02d}Z",
            "message": {"role": kind, "content": content},
        }
    )


@pytest.fixture(scope="session")
def oom_corpus(pod_readable_dir: Callable[[str], Path]) -> tuple[Path, list[tuple[str, int]]]:
    """The small corpus plus, sorting last, one large session: many short messages, then a record whose
    parsing needs ~200 MB more than the importer's steady state. Returns the tree and its files in the
    importer's order (sorted relative paths) with their text messages."""
    out = pod_readable_dir("oom-corpus") / "projects"
    subprocess.run(
        [sys.executable, str(MAKE_CORPUS), str(out), "--files", "6", "--profile", "small"],
        check=True,
        capture_output=True,
    )
    manifest = json.loads((out / "MANIFEST.json").read_text())
    files = [(entry["path"], int(entry["text_messages"])) for entry in manifest["entries"]]
    large = "zz-large/large-session.jsonl"
    result = {"type": "tool_result", "tool_use_id": "toolu_large", "content": "@"}
    skeleton = _record("user", [result], FILLER_MESSAGES)
    units = (LARGE_RECORD_BYTES - len(skeleton)) // 3
    tool_result = skeleton.replace('"@"', "[" + ",".join(["[]"] * units) + "]")
    lines = [_record("user", f"short note {i}", i) for i in range(FILLER_MESSAGES)]
    lines += [tool_result, _record("assistant", "read the large result", FILLER_MESSAGES + 1)]
    (out / large).parent.mkdir()
    (out / large).write_text("\n".join(lines) + "\n")
    files.append((large, FILLER_MESSAGES + 1))
    for path in (out, *out.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out, sorted(files)


def test_an_importer_the_kernel_oom_kills_after_saving_files_resumes_with_more_memory(
    kube_cluster: Any, installed: Cluster, oom_corpus: tuple[Path, list[tuple[str, int]]]
) -> None:
    ns = installed
    source, files = oom_corpus
    retry = {"factor": 4, "maxMemory": "1Gi", "maxAttempts": 2}
    # The importer's own budget at the whole limit: below it at every file's end, so only the kernel acts.
    # One chunk per message; the state saved at (nearly) every finished file.
    # The batch budget of 8 x 256 tokens, at which the two peaks below OOM_LIMIT were measured (the default's
    # smaller batches lower the steady state, and the large record then fit under the limit).
    tuning = {"operationalMemoryFraction": 1, "chunkMessages": 1, "checkpointSeconds": 0.1, "batchSize": 8}
    run = embedded_importrun("oom", source, resources={"memory": OOM_LIMIT}, memoryRetry=retry, tuning=tuning)
    ns.apply(*run)
    status = ns.wait_phase("oom", "Succeeded", "Failed", timeout=600)
    assert status["phase"] == "Succeeded", status
    assert status["lastFailure"]["reason"] == "OOMKilled", status["lastFailure"]
    assert OOM_LIMIT in status["lastFailure"]["message"]
    assert (status["attempt"], status["memory"]) == (2, "1Gi"), status  # 512Mi x 4, capped at maxMemory
    raised = next(c for c in status["conditions"] if c["type"] == "MemoryRaised")
    assert raised["status"] == "True"
    reasons = {event["reason"] for event in ns.json("get", "events")["items"]}
    assert {"OOMKilled", "AttemptStarted"} <= reasons, reasons
    (first,) = [job for job in ns.jobs("oom") if job["metadata"]["labels"]["reflection.dev/attempt"] == "1"]
    assert first["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == OOM_LIMIT
    # The run's numbers cover both attempts: every file read once, none unchanged, every message.
    numbers = status["runNumbers"]
    assert (numbers["filesRead"], numbers["filesUnchanged"]) == (len(files), 0), numbers
    assert numbers["messages"] == sum(messages for _, messages in files), numbers
    # The retry itself read only what the first attempt had not saved in the ConfigMap state (a prefix of the
    # importer's order, since files are acknowledged in order), the large file among them: its own record says.
    (retry_pod,) = ns.pods("reflection.dev/importrun=oom,reflection.dev/attempt=2")
    retried = import_ended(ns, retry_pod["metadata"]["name"])
    saved = len(files) - retried["files"]
    assert 1 <= saved < len(files), retried
    assert retried["messages"] == sum(messages for _, messages in files[saved:]), retried
    messages, duplicates = stored_messages(kube_cluster.pvc_dir(ns.namespace, "qdrant-oom") / "store")
    assert (messages, duplicates) == (sum(messages for _, messages in files), 0)
