"""Bringing a store written by earlier versions up to date: local mode into Edge, Edge shards without BM25.

Local mode kept ``<path>/meta.json`` and one sqlite file per collection under ``<path>/collection/``, each
row a pickled point. The migration streams those rows (read-only: the old files are never modified) into
Edge shards built under ``<path>/.migrating/``, checks that every point arrived, then moves the old files
aside into ``<path>/local-mode-backup/`` (delete it once you are happy) and the shards into place. A crash
at any step leaves either the old store untouched or a finished migration that the next open completes.

Edge shards made before the lexical vector existed are rebuilt with it, one at a time and the same way: the
points (dense vectors and payloads as they are: nothing is embedded again) are copied into a new shard under
``<path>/.adding-lexical/`` that adds each text's BM25 vector, counted, then swapped in for the old shard, which
is deleted. A crash leaves the old shard in place (a half-made copy is made again) or a finished copy that the
next open swaps in.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from importer.store import Point, StoreError

log = logging.getLogger(__name__)

STAGING = ".migrating"
LEXICAL_STAGING = ".adding-lexical"
BACKUP = "local-mode-backup"
_DONE_MARKER = "COMPLETE"
_LEGACY_ITEMS = ("meta.json", "collection", ".lock")
_BATCH = 256


def migrate_command(path: Path) -> str:
    return f"python -m importer migrate --qdrant-path {path}"


def is_local_mode(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "collection").is_dir()


def needs_migration(path: Path) -> bool:
    """A local-mode store, or a migration that finished copying but not swapping (a crash)."""
    return is_local_mode(path) or (path / STAGING / _DONE_MARKER).exists()


def dense_only_shards(path: Path) -> list[str]:
    """The Edge shards of ``path`` made before the lexical vector existed."""
    from importer.store.edge import has_lexical, is_shard

    return sorted(d.name for d in path.iterdir() if not d.name.startswith(".") and is_shard(d) and not has_lexical(d))


def migrate_if_needed(path: Path, *, for_writing: bool) -> None:
    """Finish or run a migration when ``path`` holds a local-mode store or shards without the lexical vector
    (the caller holds the folder lock).

    Only a writer migrates: a search stays read-only and fast, and names the command for a local-mode store
    (it searches dense-only shards by meaning alone).
    """
    if needs_migration(path):
        if not for_writing:
            raise StoreError(
                f"{path} holds a store written by an earlier version (qdrant-client local mode); migrate it "
                f"once with `{migrate_command(path)}` (or the next import run does it)"
            )
        migrate(path)
    if for_writing and ((path / LEXICAL_STAGING).exists() or dense_only_shards(path)):
        add_lexical(path)


def migrate(path: Path) -> dict[str, int]:
    """Copy every point into Edge shards, then swap them in; returns the points per collection."""
    staging = path / STAGING
    counts: dict[str, int] = {}
    if not (staging / _DONE_MARKER).exists():
        shutil.rmtree(staging, ignore_errors=True)  # a migration that crashed half-way starts over
        staging.mkdir()
        started = time.monotonic()
        for name, dimensions in _legacy_collections(path).items():
            counts[name] = _copy_collection(path / "collection" / name / "storage.sqlite", staging / name, dimensions)
        (staging / _DONE_MARKER).write_text(json.dumps(counts))
        log.info(
            "migrated the local-mode store",
            extra={"path": str(path), "points": counts, "seconds": round(time.monotonic() - started, 1)},
        )
    else:
        counts = json.loads((staging / _DONE_MARKER).read_text())
    _swap_in(path, staging)
    return counts


def add_lexical(path: Path) -> dict[str, int]:
    """Rebuild every shard without the lexical vector with it (see the module's docstring); returns the points
    copied per shard."""
    staging = path / LEXICAL_STAGING
    staging.mkdir(exist_ok=True)
    for marker in sorted(staging.glob("*.copied")):  # copies a crash kept from being swapped in
        _swap_lexical(path, staging, marker.stem)
    counts: dict[str, int] = {}
    for name in dense_only_shards(path):
        started = time.monotonic()
        shutil.rmtree(staging / name, ignore_errors=True)  # a copy that crashed half-way starts over
        counts[name] = _copy_shard(path / name, staging / name)
        (staging / f"{name}.copied").write_text(str(counts[name]))
        _swap_lexical(path, staging, name)
        log.info(
            "added the lexical vector to a shard made before it existed",
            extra={"collection": name, "points": counts[name], "seconds": round(time.monotonic() - started, 1)},
        )
    shutil.rmtree(staging)
    return counts


def _copy_shard(source: Path, target: Path) -> int:
    import qdrant_edge as edge

    from importer.store.edge import create_shard, dense_of, dimensions_of, to_edge_points

    old = edge.EdgeShard.load(str(source))
    try:
        new = create_shard(target, dimensions_of(source))
        try:
            copied = 0
            offset = None
            while True:
                request = edge.ScrollRequest(offset=offset, limit=_BATCH, with_payload=True, with_vector=True)
                records, offset = old.scroll(request)
                points = [Point(str(r.id), dense_of(r.vector), dict(r.payload or {})) for r in records]
                if points:
                    new.update(edge.UpdateOperation.upsert_points(to_edge_points(points)))
                    copied += len(points)
                if offset is None:
                    break
            stored = int(new.count(edge.CountRequest(exact=True)))
            if stored != copied:
                raise StoreError(f"adding the lexical vector to {source}: {copied} points read but {stored} stored")
            new.flush()
        finally:
            new.close()
    finally:
        old.close()
    return copied


def _swap_lexical(path: Path, staging: Path, name: str) -> None:
    """The old shard aside, the copy in place, the old one deleted; each step may be repeated after a crash."""
    old, copy, aside = path / name, staging / name, staging / f"{name}.old"
    if copy.exists():
        if old.exists():
            old.rename(aside)
        copy.rename(old)
    shutil.rmtree(aside, ignore_errors=True)
    (staging / f"{name}.copied").unlink()


def _legacy_collections(path: Path) -> dict[str, int]:
    meta = json.loads((path / "meta.json").read_text())
    sizes: dict[str, int] = {}
    for name, config in meta.get("collections", {}).items():
        vectors = config.get("vectors") or {}
        if "size" not in vectors:
            raise StoreError(f"{path}: collection {name} has named vectors, which this importer never wrote")
        sizes[name] = int(vectors["size"])
    return sizes


def _copy_collection(sqlite_file: Path, target: Path, dimensions: int) -> int:
    import qdrant_edge as edge

    from importer.store.edge import create_shard, to_edge_points

    shard = create_shard(target, dimensions)
    copied = 0
    try:
        batch: list[Point] = []
        for point in _legacy_points(sqlite_file):
            batch.append(point)
            if len(batch) == _BATCH:
                shard.update(edge.UpdateOperation.upsert_points(to_edge_points(batch)))
                copied += len(batch)
                batch = []
        if batch:
            shard.update(edge.UpdateOperation.upsert_points(to_edge_points(batch)))
            copied += len(batch)
        stored = int(shard.count(edge.CountRequest(exact=True)))
        if stored != copied:
            raise StoreError(f"migrating {sqlite_file}: {copied} points read but {stored} stored; nothing was changed")
        shard.flush()
    finally:
        shard.close()
    return copied


def _legacy_points(sqlite_file: Path) -> Iterator[Point]:
    """Each point once, newest write first, streamed (memory stays bounded by one row and the id set)."""
    if not sqlite_file.exists():
        return
    # Unpickling needs qdrant-client's model classes importable: only a migration pays for that import.
    import qdrant_client.http.models  # noqa: F401

    connection = sqlite3.connect(f"file:{sqlite_file}?mode=ro", uri=True)
    try:
        seen: set[Any] = set()
        for (value,) in connection.execute("SELECT point FROM points ORDER BY rowid DESC"):
            stored = pickle.loads(value)
            point_id = _normal_id(stored.id)
            if point_id in seen:  # an older row of a point written again
                continue
            seen.add(point_id)
            if not isinstance(stored.vector, list):
                raise StoreError(f"{sqlite_file}: point {point_id} has named vectors, which this importer never wrote")
            yield Point(id=point_id, vector=list(stored.vector), payload=dict(stored.payload or {}))
    finally:
        connection.close()


def _normal_id(point_id: Any) -> Any:
    return str(uuid.UUID(str(point_id))) if isinstance(point_id, str | uuid.UUID) else point_id


def _swap_in(path: Path, staging: Path) -> None:
    """Old files aside, new shards in place; each step is a rename, and every step may be repeated."""
    backup = path / BACKUP
    backup.mkdir(exist_ok=True)
    # meta.json last: while it is there the folder still reads as a local-mode store.
    for item in sorted(_LEGACY_ITEMS, key=lambda name: name == "meta.json"):
        if (path / item).exists():
            (path / item).rename(backup / item)
    for shard in staging.iterdir():
        if shard.is_dir():
            if (path / shard.name).exists():
                raise StoreError(f"{path / shard.name} exists beside a migrated copy in {shard}: move one away")
            shard.rename(path / shard.name)
    shutil.rmtree(staging)
