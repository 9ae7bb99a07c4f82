"""The operator (in this process) against the local cluster: real API server, garbage collector, the real
node running the importer Jobs it makes in their image, embedded Qdrant stores on claim folders.

(An importer the kernel OOM-kills is tested end to end in tests/charts/test_e2e_real_node.py.)"""

from __future__ import annotations

import itertools
import json
import re

from kubernetes import client

from tests.polling import wait_for


def manifest_files(manifest: dict) -> int:
    return len(manifest["entries"])


def test_an_importrun_imports_everything_once_and_kubectl_shows_it(
    k8s, run_operator, small_corpus, kube_cluster, embedded_importrun, claim, qdrant_points
):
    source, manifest = small_corpus
    k8s.apply(claim("qdrant-logs"), embedded_importrun("logs", source, tuning={"checkpointSeconds": 0.5}))
    seen_progress: set[str] = set()
    with run_operator(k8s.namespace):

        def finished():
            status = k8s.status("logs")
            seen_progress.add(status.get("progress", ""))
            return status if status.get("phase") in ("Succeeded", "Failed") else None

        status = wait_for("the run to finish", finished, timeout=240)
        table = k8s.run("get", "importruns").stdout
        wide = k8s.run("get", "ir", "-o", "wide").stdout

    assert status["phase"] == "Succeeded", status.get("lastFailure", status)
    files = manifest_files(manifest)
    assert status["filesTotal"] == status["filesDone"] == files
    assert status["progress"] == f"{files}/{files}" and status["percent"] == 100
    assert status["chunks"] > 0
    # A first run: what it did is everything there is.
    assert status["runNumbers"]["filesUnchanged"] == 0 and status["runNumbers"]["chunks"] == status["chunks"]
    assert status["chunks"] == qdrant_points(kube_cluster.pvc_dir(k8s.namespace, "qdrant-logs") / "store")
    assert status["lastScheduleTime"] and status["completionTime"] and status["lastSuccessfulTime"]
    assert status["active"] == [] if "active" in status else True
    assert len(seen_progress - {""}) >= 2, f"progress never moved: {seen_progress}"

    header = table.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "PROGRESS", "CHUNKS", "MEMORY", "LAST", "RUN", "NEXT", "RUN", "AGE"]
    row = table.splitlines()[1].split()
    assert row[:5] == ["logs", "Succeeded", f"{files}/{files}", str(status["chunks"]), "1Gi"]
    assert "READY" in wide.splitlines()[0] and "ATTEMPT" in wide.splitlines()[0]

    jobs = k8s.jobs("logs")
    assert len(jobs) == 1
    owner = jobs[0]["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "ImportRun" and owner["name"] == "logs" and owner["controller"] is True
    pod_spec = jobs[0]["spec"]["template"]["spec"]
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert jobs[0]["spec"]["backoffLimit"] == 0
    state = k8s.get("configmap", "logs-state-0")
    assert state["metadata"]["ownerReferences"][0]["name"] == "logs"
    assert {"RunStarted", "RunSucceeded"} <= set(k8s.event_reasons("logs"))


def test_the_schema_refuses_what_it_can_check(k8s, embedded_importrun, small_corpus):
    source, _ = small_corpus
    bad_policy = embedded_importrun("bad-policy", source, concurrencyPolicy="Sometimes")
    result = k8s.apply(bad_policy, check=False)
    assert result.returncode != 0 and "spec.concurrencyPolicy" in result.stderr
    bad_memory = embedded_importrun("bad-memory", source, resources={"memory": "12 gigs"})
    result = k8s.apply(bad_memory, check=False)
    assert result.returncode != 0 and "spec.resources.memory" in result.stderr
    both = embedded_importrun("both", source)
    both["spec"]["qdrant"]["url"] = "http://qdrant:6333"
    result = k8s.apply(both, check=False)
    assert result.returncode != 0 and "spec.qdrant" in result.stderr
    assert k8s.get("importruns") == []


def test_a_bad_cron_expression_sets_ready_false_until_fixed(k8s, run_operator, embedded_importrun, small_corpus):
    source, _ = small_corpus
    k8s.apply(embedded_importrun("cron", source, schedule="61 * * * *"))
    with run_operator(k8s.namespace):

        def not_ready():
            conditions = k8s.status("cron").get("conditions") or []
            return next((c for c in conditions if c["type"] == "Ready" and c["status"] == "False"), None)

        ready = wait_for("Ready=False", not_ready, timeout=60)
        assert ready["reason"] == "InvalidSchedule" and "spec.schedule" in ready["message"]
        warnings = [e for e in k8s.events("cron") if e["type"] == "Warning"]
        assert any("spec.schedule" in e["message"] for e in warnings)
        # Jobs are created before the status is written: once the status is of the current generation, the
        # operator has carried out what it decided for this spec, and a Job it made would exist.
        generation = k8s.get("importrun", "cron")["metadata"]["generation"]
        wait_for("the current spec handled", lambda: k8s.status("cron").get("observedGeneration") == generation, 60)
        assert k8s.jobs("cron") == []
        assert k8s.status("cron")["phase"] == "Pending" and not k8s.status("cron").get("run")

        # Fixing the spec recovers without recreating the ImportRun (suspended: no run is needed here).
        k8s.run("patch", "importrun", "cron", "--type=merge", "-p", '{"spec":{"schedule":"0 3 * * *","suspend":true}}')

        def ready_again():
            conditions = k8s.status("cron").get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        wait_for("Ready=True", ready_again, timeout=60)
        assert k8s.status("cron")["phase"] == "Suspended"
        assert k8s.status("cron")["observedGeneration"] == 2


def _run_succeeded_sentence(k8s, importrun: str) -> str:
    """The RunSucceeded Event's numbers of this run, up to its seconds (which differ from run to run)."""
    (message,) = [e["message"] for e in k8s.events(importrun) if e["reason"] == "RunSucceeded"]
    return re.sub(r", \d+s importing.*", "", message)


def _import_ended(k8s, pod: str) -> dict:
    """The importer's "import ended" log record (what that process did), read with kubectl logs."""
    log = k8s.run("logs", pod, "-c", "importer").stdout
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return next(record for record in records if record.get("message") == "import ended")


def test_a_run_stopped_mid_way_and_retried_reports_the_numbers_of_one_attempt(
    k8s, run_operator, forty_file_corpus, kube_cluster, embedded_importrun, claim, qdrant_points
):
    """The first attempt stops over its memory budget (a tenth of 1Gi: less than the model) at its first
    checkpoint, with files left; the retry with 10Gi finishes. Its run's numbers are those of a one-attempt run
    over the same tree: every file read, none unchanged, every message."""
    source, manifest = forty_file_corpus
    retry = {"factor": 10, "maxMemory": "10Gi", "maxAttempts": 2}
    k8s.apply(
        claim("qdrant-once"),
        claim("qdrant-retried"),
        embedded_importrun("once", source),
        embedded_importrun(
            "retried", source, memoryRetry=retry, tuning={"operationalMemoryFraction": 0.1, "checkpointSeconds": 0.5}
        ),
    )
    with run_operator(k8s.namespace):
        once = k8s.wait_phase("once", "Succeeded", "Failed", timeout=420)
        retried = k8s.wait_phase("retried", "Succeeded", "Failed", timeout=420)
    assert once["phase"] == "Succeeded", once.get("lastFailure", once)
    assert retried["phase"] == "Succeeded", retried.get("lastFailure", retried)
    assert (retried["attempt"], retried["lastFailure"]["reason"]) == (2, "MemoryBudgetExceeded")
    (first_pod,) = k8s.get("pods", selector="reflection.dev/importrun=retried,reflection.dev/attempt=1")
    first = _import_ended(k8s, first_pod["metadata"]["name"])
    files = manifest_files(manifest)
    assert first["stopped"] == "memory" and 1 <= first["files"] < files, first

    numbers = retried["runNumbers"]
    assert (numbers["filesRead"], numbers["filesUnchanged"], numbers["filesFailed"]) == (files, 0, 0)
    assert numbers["messages"] == manifest["text_messages"]
    store = kube_cluster.pvc_dir(k8s.namespace, "qdrant-retried") / "store"
    assert numbers["chunks"] == retried["chunks"] == qdrant_points(store)
    assert numbers["seconds"] > first["seconds"]  # both attempts' seconds
    assert {**numbers, "seconds": 0} == {**once["runNumbers"], "seconds": 0}
    assert retried["progress"] == once["progress"] == f"{files}/{files}"
    assert _run_succeeded_sentence(k8s, "retried") == _run_succeeded_sentence(k8s, "once")


def test_failures_retry_then_fail_with_the_pods_last_log_lines(k8s, run_operator, small_corpus):
    """A Qdrant server that is not there: the importer fails; after the retries the message shows why."""
    source, _ = small_corpus
    body = {
        "apiVersion": "reflection.dev/v1alpha1",
        "kind": "ImportRun",
        "metadata": {"name": "unreachable"},
        "spec": {
            "source": {"volume": {"hostPath": {"path": str(source)}}},
            "qdrant": {"url": "http://127.0.0.1:9"},
            "resources": {"memory": "1Gi"},
            "failureRetry": {"maxRetries": 1, "backoffSeconds": 1},
        },
    }
    k8s.apply(body)
    with run_operator(k8s.namespace):
        status = k8s.wait_phase("unreachable", "Failed", timeout=300)
    assert status["attempt"] == 2
    message = status["lastFailure"]["message"]
    assert "exited with 1" in message and "maxRetries=1" in message
    assert len(message) > 80, message  # the Pod's last log lines, not just an exit code
    assert "RetryingAfterError" in k8s.event_reasons("unreachable")


def test_a_missing_secret_shows_on_the_importrun_until_it_exists(k8s, run_operator, small_corpus):
    """The operator cannot read Secrets: the Pod's CreateContainerConfigError tells it, naming the field."""
    source, _ = small_corpus
    body = {
        "apiVersion": "reflection.dev/v1alpha1",
        "kind": "ImportRun",
        "metadata": {"name": "keyed"},
        "spec": {
            "source": {"volume": {"hostPath": {"path": str(source)}}},
            "qdrant": {"url": "http://127.0.0.1:9", "apiKeySecretRef": {"name": "qdrant", "key": "api-key"}},
            "suspend": False,
            "failureRetry": {"maxRetries": 0},
        },
    }
    k8s.apply(body)
    with run_operator(k8s.namespace):
        ready = wait_for("Ready=False", lambda: ready_false(k8s, "keyed"), timeout=90)
        assert ready["reason"] == "MissingSecret" and "spec.qdrant.apiKeySecretRef" in ready["message"]
        assert k8s.status("keyed")["phase"] == "Pending"
        assert k8s.status("keyed")["lastFailure"]["reason"] == "MissingSecret"
        k8s.run("create", "secret", "generic", "qdrant", "--from-literal=api-key=s3cret")
        wait_for("Ready=True once the Secret exists", lambda: ready_true(k8s, "keyed"), timeout=90)
        assert "PodsCreated" in k8s.event_reasons("keyed")
    job = k8s.jobs("keyed")[0]
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["IMPORTER_QDRANT_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "qdrant", "key": "api-key"}}


def ready_condition(k8s, name: str) -> dict:
    conditions = k8s.status(name).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), {})


def ready_false(k8s, name: str) -> dict | None:
    ready = ready_condition(k8s, name)
    return ready if ready.get("status") == "False" else None


def ready_true(k8s, name: str) -> bool:
    return ready_condition(k8s, name).get("status") == "True"


def test_a_restarted_operator_adopts_its_job_instead_of_making_another(
    k8s, run_operator, small_corpus, kube_api, embedded_importrun, claim
):
    source, _ = small_corpus
    k8s.apply(claim("qdrant-restart"), embedded_importrun("restart", source))
    with run_operator(k8s.namespace):
        wait_for("the Job", lambda: k8s.jobs("restart"), timeout=60)
        wait_for("the status to record the run", lambda: k8s.status("restart").get("run"), timeout=30)
    job_names = [j["metadata"]["name"] for j in k8s.jobs("restart")]
    # The worst case: the operator stopped after making the Job but before recording it in the status.
    client.CustomObjectsApi(kube_api).patch_namespaced_custom_object_status(
        "reflection.dev",
        "v1alpha1",
        k8s.namespace,
        "importruns",
        "restart",
        {"status": {"run": None, "lastScheduleTime": None, "lastHandledScheduleTime": None}},
        _content_type="application/merge-patch+json",
    )
    with run_operator(k8s.namespace):
        status = k8s.wait_phase("restart", "Succeeded", "Failed", timeout=240)
    assert status["phase"] == "Succeeded"
    assert [j["metadata"]["name"] for j in k8s.jobs("restart")] == job_names
    assert "RunAdopted" in k8s.event_reasons("restart")


def test_a_schedule_fires_and_forbid_skips_while_a_run_is_active(
    k8s, run_operator, small_corpus, embedded_importrun, claim
):
    source, _ = small_corpus
    # Every second: shorter than any run (the importer alone takes longer to start and load its model),
    # so a run is still active when the next is due.
    k8s.apply(claim("qdrant-every"), embedded_importrun("every", source, schedule="* * * * * *"))
    with run_operator(k8s.namespace):
        wait_for("a run skipped", lambda: "RunSkipped" in k8s.event_reasons("every"), timeout=120)
        status = k8s.status("every")
        assert status["lastScheduleTime"] and status["nextScheduleTime"]
        assert len([j for j in k8s.jobs("every") if not j.get("status", {}).get("completionTime")]) <= 1
        k8s.run("patch", "importrun", "every", "--type=merge", "-p", '{"spec":{"suspend":true}}')
        status = k8s.wait_phase("every", "Suspended", timeout=120)
    assert status.get("nextScheduleTime") is None
    # Forbid: one run after another, never two at once. Each run's Jobs span [first start, last end]; a run
    # still going at the end (suspend lets it finish) is the last one.
    spans = sorted(_run_spans(k8s.jobs("every")).items(), key=lambda item: item[1][0])
    assert spans, "no run started"
    for (earlier, (_, ended)), (later, (started, _)) in itertools.pairwise(spans):
        assert ended is not None and ended <= started, f"run {later} started while run {earlier} was active"


def _run_spans(jobs: list[dict]) -> dict[str, tuple[str, str | None]]:
    """Per run id: when its first Job started and when its last Job ended (None while one is active)."""
    spans: dict[str, tuple[str, str | None]] = {}
    for job in jobs:
        run_id = job["metadata"]["labels"]["reflection.dev/run-id"]
        status = job.get("status") or {}
        started = status.get("startTime") or job["metadata"]["creationTimestamp"]
        finished = [
            c["lastTransitionTime"] for c in status.get("conditions") or [] if c["type"] in ("Complete", "Failed")
        ]
        ended = max(finished) if finished else None
        if run_id in spans:
            first, last = spans[run_id]
            started = min(first, started)
            ended = None if last is None or ended is None else max(last, ended)
        spans[run_id] = (started, ended)
    return spans


def test_replace_stops_the_active_run_and_the_next_resumes(
    k8s, run_operator, small_corpus, kube_cluster, embedded_importrun, claim, qdrant_points
):
    source, _ = small_corpus
    k8s.apply(
        claim("qdrant-replace"),
        # Every second: shorter than any run, so each run is still active when the next is due.
        embedded_importrun("replace", source, schedule="* * * * * *", concurrencyPolicy="Replace"),
    )
    with run_operator(k8s.namespace):
        wait_for("a run replaced", lambda: "RunReplaced" in k8s.event_reasons("replace"), timeout=120)
        k8s.run("patch", "importrun", "replace", "--type=merge", "-p", '{"spec":{"suspend":true}}')
        status = k8s.wait_phase("replace", "Suspended", timeout=240)
        # Suspending stops new runs, not the running one: wait for it to end.
        wait_for("the last run to end", lambda: not k8s.status("replace").get("active"), timeout=240)
        status = k8s.status("replace")
    assert status["run"]["state"] == "Succeeded", status
    assert status["chunks"] == qdrant_points(kube_cluster.pvc_dir(k8s.namespace, "qdrant-replace") / "store")
    assert status["filesDone"] == status["filesTotal"]


def test_deleting_an_importrun_removes_its_jobs_and_state(k8s, run_operator, small_corpus, embedded_importrun, claim):
    source, _ = small_corpus
    k8s.apply(claim("qdrant-gone"), embedded_importrun("gone", source))
    with run_operator(k8s.namespace):
        wait_for("the Job", lambda: k8s.jobs("gone"), timeout=60)
        wait_for("the state ConfigMap", lambda: k8s.get("configmap", "gone-state-0"), timeout=60)
        k8s.run("delete", "importrun", "gone", "--wait=true", "--timeout=60s")
        wait_for("the Jobs to go", lambda: k8s.jobs("gone") == [], timeout=90)
        wait_for("the state to go", lambda: k8s.get("configmap", "gone-state-0") is None, timeout=90)
        wait_for("the Pods to go", lambda: k8s.get("pods", selector="reflection.dev/importrun=gone") == [], timeout=90)


def test_a_job_the_api_server_refuses_sets_ready_false_until_the_spec_changes(
    k8s, run_operator, small_corpus, embedded_importrun, claim
):
    """Some volume settings are only refused when the Job is made (here a hostPath with '..')."""
    source, _ = small_corpus
    crooked = embedded_importrun("refused", source)
    crooked["spec"]["source"] = {"volume": {"hostPath": {"path": f"{source}/../{source.name}"}}}
    k8s.apply(claim("qdrant-refused"), crooked)
    with run_operator(k8s.namespace):

        def not_ready():
            conditions = k8s.status("refused").get("conditions") or []
            return next((c for c in conditions if c["type"] == "Ready" and c["status"] == "False"), None)

        ready = wait_for("Ready=False", not_ready, timeout=60)
        assert ready["reason"] == "JobRejected" and "hostPath" in ready["message"]
        assert "JobRejected" in k8s.event_reasons("refused")
        assert k8s.jobs("refused") == []
        fixed = {"spec": {"suspend": True, "source": {"volume": {"hostPath": {"path": str(source)}}}}}
        k8s.run("patch", "importrun", "refused", "--type=merge", "-p", json.dumps(fixed))
        k8s.wait_phase("refused", "Suspended", timeout=60)
        assert next(c for c in k8s.status("refused")["conditions"] if c["type"] == "Ready")["status"] == "True"
