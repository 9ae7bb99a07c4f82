"""The operator's Prometheus metrics, read back through Prometheus' own text parser."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from reflection_operator.metrics import Metrics
from reflection_operator.progress import Progress

from importer.contract import RunNumbers


def _families(registry: CollectorRegistry) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(generate_latest(registry).decode())}


def _value(families: dict[str, Metric], sample_name: str, **labels: str) -> float | None:
    for family in families.values():
        for sample in family.samples:
            if sample.name == sample_name and sample.labels == labels:
                return float(sample.value)
    return None


def _recorded() -> tuple[Metrics, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.count("started", "team")
    metrics.count("oom_retries", "team")
    metrics.count("oom_retries", "team")
    metrics.reconcile_errors.labels("team").inc()
    run = RunNumbers(files_read=2, files_unchanged=5, files_failed=1, chunks=7)
    progress = Progress(files_total=10, files_done=4, files_failed=1, chunks=33, run=run)
    metrics.record_progress("team", "nightly", progress)
    return metrics, registry


def test_counters_and_per_importrun_gauges_as_prometheus_parses_them():
    metrics, registry = _recorded()
    families = _families(registry)
    assert _value(families, "reflection_runs_started_total", importrun_namespace="team") == 1
    assert _value(families, "reflection_oom_retries_total", importrun_namespace="team") == 2
    assert _value(families, "reflection_reconcile_errors_total", importrun_namespace="team") == 1
    run_labels = {"importrun_namespace": "team", "importrun": "nightly"}
    assert _value(families, "reflection_importrun_files", **run_labels) == 10
    assert _value(families, "reflection_importrun_files_done", **run_labels) == 4
    assert _value(families, "reflection_importrun_chunks", **run_labels) == 33
    assert _value(families, "reflection_importrun_run_files_handled", **run_labels) == 8
    assert _value(families, "reflection_importrun_run_chunks_written", **run_labels) == 7
    metrics.forget("team", "nightly")
    metrics.forget("team", "nightly")  # twice: harmless
    assert _value(_families(registry), "reflection_importrun_chunks", **run_labels) is None


def test_names_follow_the_prometheus_naming_guide():
    _, registry = _recorded()
    families = _families(registry)
    assert families, "nothing exposed"
    for family in families.values():
        # Only counters end in _total; every sample carries the ImportRun's namespace under a label that a
        # scrape does not overwrite with the target's own namespace.
        assert family.name.startswith("reflection_"), family.name
        if family.type == "counter":
            suffixes = {sample.name.removeprefix(family.name) for sample in family.samples}
            assert suffixes <= {"_total", "_created"}, family.name
        else:
            assert family.type == "gauge" and not family.name.endswith("_total"), family.name
        for sample in family.samples:
            assert "namespace" not in sample.labels and sample.labels.get("importrun_namespace") == "team", sample
