"""The embedded store: Qdrant's own engine in-process (Qdrant Edge), one shard folder per collection.

``<path>/<collection>/`` is one Edge shard (Edge has no collections). Its write-ahead log stays on (the
default): with it a ``kill -9`` loses no acknowledged point and a second opener of a shard fails at once;
without it two writers silently lose points. A lock file on the whole folder makes a second importer fail
at once too, before it touches any shard, with a message that says what holds it.

Vectors and payloads live on disk (memory-mapped): the importer's RSS stays flat however large the store
grows, and the kernel keeps the hot pages cached. New points are searched by brute force until the engine
indexes them; :meth:`EdgeStore.finish` builds that index after a run that left many points unindexed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as edge

from importer.points import collection_name
from importer.store import INDEXED_FIELDS, Point, ScoredPayload, StoreBusy, StoreError, StoreMissing

log = logging.getLogger(__name__)

LOCK_FILE = ".importer.lock"
#: Shards kept open at once (least recently used closed first). Each open shard maps its write-ahead log
#: (two 32 MiB files) and keeps search threads: ~18 MB of RSS per shard measured, mostly file-backed pages,
#: so a user with fifty projects would otherwise pay ~900 MB. Imports write one project at a time. A store
#: opened for reading (search) keeps every shard it touches open instead: a search visits them all, and
#: reopening a shard costs 100-300 ms, far more than the query.
MAX_OPEN_SHARDS = 2
#: How long an opener waits for a search that holds the store (a command-line search takes about a second,
#: the MCP server releases the store after a few idle seconds) before it gives up.
SEARCH_WAIT_SECONDS = 15.0
SEARCH_HOLDER = "a search"
_SHARD_CONFIG = "edge_config.json"  # written by Edge in every shard folder
_SCHEMAS = {"keyword": edge.PayloadSchemaType.Keyword, "datetime": edge.PayloadSchemaType.Datetime}


def is_shard(folder: Path) -> bool:
    return (folder / _SHARD_CONFIG).is_file()


def shard_config(dimensions: int) -> Any:
    vectors = edge.EdgeVectorParams(size=dimensions, distance=edge.Distance.Cosine, on_disk=True)
    return edge.EdgeConfig(vectors=vectors, on_disk_payload=True)


def create_shard(folder: Path, dimensions: int) -> Any:
    shard = edge.EdgeShard.create(str(folder), shard_config(dimensions))
    for field, kind in INDEXED_FIELDS.items():
        shard.update(edge.UpdateOperation.create_field_index(field, _SCHEMAS[kind]))
    return shard


def to_edge_points(points: Sequence[Point]) -> list[Any]:
    return [edge.Point(p.id, p.vector, p.payload) for p in points]


class FolderLock:
    """An exclusive, non-blocking lock on the store folder; the kernel drops it when the process dies.

    The holder writes who it is into the file. A search holds the store for a moment (the MCP server for a
    few idle seconds), an import for as long as it runs: so whoever finds a search holding it waits up to
    :data:`SEARCH_WAIT_SECONDS` for it, and whoever finds an import holding it fails at once.
    """

    def __init__(self, folder: Path, *, reading: bool = False) -> None:
        self.path = folder / LOCK_FILE
        self.holder = f"pid {os.getpid()} ({SEARCH_HOLDER if reading else 'an import'})"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + SEARCH_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                # An empty file: the holder has just locked it and not yet written its name.
                if (not holder or holder.endswith(f"({SEARCH_HOLDER})")) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                raise StoreBusy(
                    f"the embedded store {self.path.parent} is in use by {holder or 'another process'}: one "
                    "process at a time may open it (an import or a search); run again when it has finished"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class EdgeStore:
    where = "embedded store"

    def __init__(
        self, path: Path, *, suffix: str, lock: FolderLock, index_min_points: int = 0, max_open: int | None = None
    ) -> None:
        self.path = path
        #: Shards kept open at once (None: no limit).
        self.max_open = max_open
        self.suffix = suffix
        #: finish() indexes a shard with at least this many unindexed points (0: never).
        self.index_min_points = index_min_points
        self._lock = lock
        self._shards: dict[str, Any] = {}  # insertion order = least recently used first
        self._touched: set[str] = set()  # shards written in this run: finish() considers indexing them

    @classmethod
    def open(cls, path: Path, *, suffix: str, for_writing: bool = True, index_min_points: int = 0) -> EdgeStore:
        """Open (for writing: create) the store; migrate a qdrant-client local-mode store found there."""
        from importer.store import legacy

        if not path.is_dir():
            if not for_writing:
                raise StoreMissing(f"the embedded store {path} does not exist (nothing has been imported there)")
            path.mkdir(parents=True)
        lock = FolderLock(path, reading=not for_writing)
        lock.acquire()
        try:
            legacy.migrate_if_needed(path, for_writing=for_writing)
        except BaseException:
            lock.release()
            raise
        max_open = MAX_OPEN_SHARDS if for_writing else None
        return cls(path, suffix=suffix, lock=lock, index_min_points=index_min_points, max_open=max_open)

    def collection_for(self, project: str) -> str:
        return collection_name(project, self.suffix)

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if points:
            shard = self._shard(collection, dimensions=len(points[0].vector))
            shard.update(edge.UpdateOperation.upsert_points(to_edge_points(points)))
            self._touched.add(collection)

    def delete_source(self, collection: str, source: str) -> None:
        if is_shard(self.path / collection):
            self._shard(collection).update(edge.UpdateOperation.delete_points_by_filter(_source_filter(source)))

    def collections(self) -> list[str]:
        return sorted(d.name for d in self.path.iterdir() if d.name.endswith(f"_{self.suffix}") and is_shard(d))

    def count(self, collection: str, source: str | None = None) -> int:
        condition = _source_filter(source) if source is not None else None
        return int(self._shard(collection).count(edge.CountRequest(exact=True, filter=condition)))

    def scroll(self, collection: str, *, start: str | None, limit: int) -> tuple[list[Point], str | None]:
        request = edge.ScrollRequest(
            offset=uuid.UUID(start) if start else None, limit=limit, with_payload=True, with_vector=True
        )
        records, next_start = self._shard(collection).scroll(request)
        points = [Point(id=str(r.id), vector=list(r.vector), payload=dict(r.payload or {})) for r in records]
        return points, None if next_start is None else str(next_start)

    def query(self, collection: str, vector: list[float], limit: int) -> list[ScoredPayload]:
        request = edge.QueryRequest(limit=limit, query=edge.Query.Nearest(vector), with_payload=True)
        found = self._shard(collection).query(request)
        return [ScoredPayload(score=float(p.score), payload=dict(p.payload or {})) for p in found]

    def finish(self) -> None:
        """Index the shards that many points reached unindexed: one blocking ``optimize()`` each."""
        if self.index_min_points <= 0:
            return
        for name in sorted(self._touched):
            shard = self._shard(name)
            info = shard.info()
            unindexed = info.points_count - info.indexed_vectors_count
            if unindexed < self.index_min_points:
                continue
            started = time.monotonic()
            shard.optimize()
            log.info(
                "indexed the embedded store",
                extra={"collection": name, "points": unindexed, "seconds": round(time.monotonic() - started, 1)},
            )

    def close(self) -> None:
        try:
            for shard in self._shards.values():
                shard.close()
            self._shards.clear()
        finally:
            self._lock.release()

    def _shard(self, collection: str, dimensions: int | None = None) -> Any:
        shard = self._shards.pop(collection, None)
        if shard is not None:
            self._shards[collection] = shard  # now the most recently used
            return shard
        while self.max_open is not None and len(self._shards) >= self.max_open:
            self._shards.pop(next(iter(self._shards))).close()
        folder = self.path / collection
        try:
            if is_shard(folder):
                shard = edge.EdgeShard.load(str(folder))
            elif dimensions is not None:
                shard = create_shard(folder, dimensions)
            else:
                raise StoreMissing(f"the embedded store {self.path} has no collection {collection}")
        except StoreError:
            raise
        except Exception as error:  # Edge raises plain Exception; WouldBlock means another opener
            if "WouldBlock" in str(error):
                raise StoreBusy(f"{folder} is open in another process; run again when it has finished") from error
            raise
        self._shards[collection] = shard
        return shard


def _source_filter(source: str) -> Any:
    return edge.Filter(must=[edge.FieldCondition("source", match=edge.MatchValue(source))])
