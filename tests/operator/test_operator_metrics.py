"""The operator's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from reflection_operator.metrics import Metrics
from reflection_operator.progress import Progress


def test_counters_and_per_importrun_gauges():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.count("started", "team")
    metrics.count("oom_retries", "team")
    metrics.count("oom_retries", "team")
    metrics.reconcile_errors.labels("team").inc()
    metrics.record_progress("team", "nightly", Progress(files_total=10, files_done=4, files_failed=1, chunks=33))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("reflection_runs_started_total", namespace="team") == 1
    assert value("reflection_oom_retries_total", namespace="team") == 2
    assert value("reflection_reconcile_errors_total", namespace="team") == 1
    assert value("reflection_files_done", namespace="team", importrun="nightly") == 4
    assert value("reflection_chunks", namespace="team", importrun="nightly") == 33
    metrics.forget("team", "nightly")
    metrics.forget("team", "nightly")  # twice: harmless
    assert value("reflection_chunks", namespace="team", importrun="nightly") is None
    assert b"reflection_runs_succeeded_total" in generate_latest(registry)
