"""Copy the embedded store to a Qdrant server: same collections, ids and payloads, nothing re-embedded.

Idempotent (points are upserted under their own ids, so a repeat overwrites) and resumable: after each
acknowledged page the id the next page starts at is saved in ``<store>/.export-<server hash>.json``, and a
new run continues from there; a finished export removes that file, so the next one copies everything again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from importer.store import Sink

log = logging.getLogger(__name__)

_DONE = "done"


@dataclass
class ExportStats:
    points: dict[str, int] = field(default_factory=dict)
    skipped_collections: list[str] = field(default_factory=list)


def progress_file(store_path: Path, server: str) -> Path:
    return store_path / f".export-{hashlib.sha256(server.encode()).hexdigest()[:12]}.json"


def export(source: Sink, target: Sink, progress: Path, *, page: int = 256) -> ExportStats:
    """Upsert every point of ``source`` into ``target``, resuming where ``progress`` says a run stopped."""
    done: dict[str, str] = json.loads(progress.read_text()) if progress.exists() else {}
    stats = ExportStats()
    for collection in source.collections():
        start = done.get(collection)
        if start == _DONE:
            stats.skipped_collections.append(collection)
            continue
        copied = 0
        while True:
            points, start = source.scroll(collection, start=start, limit=page)
            target.upsert(collection, points)
            copied += len(points)
            done[collection] = start or _DONE
            _save(progress, done)
            if start is None:
                break
        stats.points[collection] = copied
        log.info("exported a collection", extra={"collection": collection, "points": copied})
    progress.unlink(missing_ok=True)  # finished: the next export starts over (and overwrites, harmlessly)
    return stats


def _save(progress: Path, done: dict[str, str]) -> None:
    temporary = progress.with_suffix(".tmp")
    temporary.write_text(json.dumps(done))
    os.replace(temporary, progress)
