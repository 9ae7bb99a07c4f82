"""Prometheus metrics of the operator (served by prometheus_client's own HTTP server)."""

from __future__ import annotations

import contextlib

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, start_http_server

from .progress import Progress

_LABELS = ("namespace",)
_RUN_LABELS = ("namespace", "importrun")


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def counter(name: str, help_text: str) -> Counter:
            return Counter(f"reflection_{name}", help_text, _LABELS, registry=registry)

        self.counters: dict[str, Counter] = {
            "started": counter("runs_started", "Runs started"),
            "succeeded": counter("runs_succeeded", "Runs that imported everything"),
            "failed": counter("runs_failed", "Runs that failed for good"),
            "oom_retries": counter("oom_retries", "Attempts restarted with more memory after an OOM kill"),
            "error_retries": counter("error_retries", "Attempts restarted after another failure"),
            "skipped": counter("runs_skipped", "Scheduled runs skipped (concurrencyPolicy Forbid)"),
            "missed": counter("runs_missed", "Scheduled runs missed (late past the deadline, or not started)"),
        }
        self.reconcile_errors = counter("reconcile_errors", "Reconciliations that failed and will be retried")
        self.files_total = Gauge(
            "reflection_files_total",
            "Files in the source of the current or last run",
            _RUN_LABELS,
            registry=registry,
        )
        self.files_done = Gauge("reflection_files_done", "Files imported", _RUN_LABELS, registry=registry)
        self.files_failed = Gauge(
            "reflection_files_failed", "Files that could not be imported", _RUN_LABELS, registry=registry
        )
        self.chunks = Gauge("reflection_chunks", "Chunks (points) written", _RUN_LABELS, registry=registry)

    def count(self, name: str, namespace: str) -> None:
        self.counters[name].labels(namespace).inc()

    def record_progress(self, namespace: str, importrun: str, progress: Progress) -> None:
        self.files_total.labels(namespace, importrun).set(progress.files_total)
        self.files_done.labels(namespace, importrun).set(progress.files_done)
        self.files_failed.labels(namespace, importrun).set(progress.files_failed)
        self.chunks.labels(namespace, importrun).set(progress.chunks)

    def forget(self, namespace: str, importrun: str) -> None:
        """Drops a deleted ImportRun's series."""
        for gauge in (self.files_total, self.files_done, self.files_failed, self.chunks):
            with contextlib.suppress(KeyError):  # never recorded
                gauge.remove(namespace, importrun)


_shared: Metrics | None = None


def shared() -> Metrics:
    """One set of metrics per process: operators restarted in one process (tests) reuse it."""
    global _shared
    if _shared is None:
        _shared = Metrics()
    return _shared


def serve(port: int) -> None:
    start_http_server(port)
