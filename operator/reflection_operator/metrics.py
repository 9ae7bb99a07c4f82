"""Prometheus metrics of the operator (served by prometheus_client's own HTTP server).

Names follow the Prometheus naming guide: counters end in ``_total`` (prometheus_client adds it), gauges
do not. The ImportRun's namespace is the label ``importrun_namespace``: a label called ``namespace`` would
be renamed ``exported_namespace`` by a scrape that sets the target's own ``namespace`` label.
"""

from __future__ import annotations

import contextlib

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, start_http_server

from .progress import Progress

_LABELS = ("importrun_namespace",)
_RUN_LABELS = ("importrun_namespace", "importrun")


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def counter(name: str, help_text: str) -> Counter:
            return Counter(f"reflection_{name}", help_text, _LABELS, registry=registry)

        def gauge(name: str, help_text: str) -> Gauge:
            return Gauge(f"reflection_importrun_{name}", help_text, _RUN_LABELS, registry=registry)

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
        self.gauges: dict[str, Gauge] = {
            "files": gauge("files", "Files in the source, as the current or last run found them"),
            "files_done": gauge("files_done", "Files of the source imported up to their end (every run so far)"),
            "files_failed": gauge("files_failed", "Files of the source that could not be imported"),
            "chunks": gauge("chunks", "Chunks (Qdrant points) written for the source's files (every run so far)"),
            "run_files_handled": gauge(
                "run_files_handled", "Files the current or last run has handled (read, unchanged or failed)"
            ),
            "run_chunks_written": gauge("run_chunks_written", "Chunks (Qdrant points) the current or last run wrote"),
        }

    def count(self, name: str, namespace: str) -> None:
        self.counters[name].labels(namespace).inc()

    def record_progress(self, namespace: str, importrun: str, progress: Progress) -> None:
        values = {
            "files": progress.files_total,
            "files_done": progress.files_done,
            "files_failed": progress.files_failed,
            "chunks": progress.chunks,
            "run_files_handled": progress.run.files_processed,
            "run_chunks_written": progress.run.chunks,
        }
        for name, value in values.items():
            self.gauges[name].labels(namespace, importrun).set(value)

    def forget(self, namespace: str, importrun: str) -> None:
        """Drops a deleted ImportRun's series."""
        for gauge in self.gauges.values():
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
