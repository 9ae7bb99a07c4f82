"""The embedded store: Qdrant's own engine in-process (Qdrant Edge), one shard folder per collection.

``<path>/<collection>/`` is one Edge shard (Edge has no collections). Its write-ahead log stays on (the
default): with it a ``kill -9`` loses no acknowledged point and a second opener of a shard fails at once;
without it two writers silently lose points. A lock file on the whole folder makes a second importer fail
at once too, before it touches any shard, with a message that says what holds it.

Vectors and payloads live on disk (memory-mapped), and the kernel keeps the hot pages cached; a shard that is
written grows in the importer's memory until it is closed (see :data:`MAX_OPEN_SHARDS`). New points are
searched by brute force until the engine indexes them; :meth:`EdgeStore.finish` builds that index after a run
that left many points unindexed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import qdrant_edge as edge

from importer.lexical import SPARSE_VECTOR, Sparse, document_vector
from importer.points import collection_name
from importer.store import (
    INDEXED_FIELDS,
    RRF_K,
    Point,
    ScoredPayload,
    StoreBusy,
    StoreError,
    StoreMissing,
    StoreQuery,
)

log = logging.getLogger(__name__)

LOCK_FILE = ".importer.lock"
#: Shards an import keeps open at once (least recently used closed first). A shard being written grows in
#: the importer's memory with every point until it is closed: Edge keeps its one appendable segment's
#: indexes in memory (~2.2 KB per point, anonymous) and the vector and payload pages written stay mapped
#: (~3.8 KB per point, file-backed), besides the write-ahead log's 32 MiB segments, whose written pages
#: stay mapped too (0-32 MB). Measured by writing the importer's realistic chunks (random vectors) through
#: this class: 12,800 points took RSS from 58 to 151 MB, a second shard of 12,800 to 231 MB, closing both
#: back to 73 MB. Files are read in path order, so an import writes one project after another: with one
#: shard open the previous project's memory goes as soon as the next project starts, where with two it stayed
#: while the next project was written. Coming back to a closed shard costs a reopen (0.13 s at 12,800 points,
#: replaying its log).
#: A store opened for reading (search) keeps every shard it touches open instead: a search visits them all,
#: and reopening a shard costs 100-300 ms, far more than the query.
MAX_OPEN_SHARDS = 1
#: How long an opener waits for a search that holds the store (a command-line search takes about a second,
#: the MCP server releases the store after a few idle seconds) before it gives up.
SEARCH_WAIT_SECONDS = 15.0
SEARCH_HOLDER = "a search"
_SHARD_CONFIG = "edge_config.json"  # written by Edge in every shard folder
_SCHEMAS = {"keyword": edge.PayloadSchemaType.Keyword, "datetime": edge.PayloadSchemaType.Datetime}


def is_shard(folder: Path) -> bool:
    return (folder / _SHARD_CONFIG).is_file()


def has_lexical(folder: Path) -> bool:
    """Whether the shard keeps the lexical vector (shards made before it existed do not)."""
    return SPARSE_VECTOR in (_config(folder).get("sparse_vectors") or {})


def dimensions_of(folder: Path) -> int:
    """The size of the shard's dense vectors."""
    return int(_config(folder)["vectors"][""]["size"])


def _config(folder: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((folder / _SHARD_CONFIG).read_text())
    return config


def shard_config(dimensions: int) -> Any:
    vectors = edge.EdgeVectorParams(size=dimensions, distance=edge.Distance.Cosine, on_disk=True)
    # The sparse index memory-mapped like the dense vectors, so the importer's RSS stays flat.
    lexical = edge.EdgeSparseVectorParams(modifier=edge.Modifier.Idf, memory=edge.Memory.Cached)
    return edge.EdgeConfig(vectors=vectors, sparse_vectors={SPARSE_VECTOR: lexical}, on_disk_payload=True)


def create_shard(folder: Path, dimensions: int) -> Any:
    shard = edge.EdgeShard.create(str(folder), shard_config(dimensions))
    for field, kind in INDEXED_FIELDS.items():
        shard.update(edge.UpdateOperation.create_field_index(field, _SCHEMAS[kind]))
    return shard


def to_edge_points(points: Sequence[Point], *, lexical: bool = True) -> list[Any]:
    """Edge points; with ``lexical``, each with its text's BM25 vector beside the dense one."""
    if not lexical:
        return [edge.Point(p.id, p.vector, p.payload) for p in points]
    return [edge.Point(p.id, {"": p.vector, SPARSE_VECTOR: _lexical_of(p)}, p.payload) for p in points]


def _lexical_of(point: Point) -> Any:
    return _sparse(document_vector(str(point.payload.get("text", ""))))


def _sparse(vector: Sparse) -> Any:
    return edge.SparseVector(vector.indices, vector.values)


def dense_of(vector: Any) -> list[float]:
    """The dense vector of a record: the whole vector, or the unnamed one beside the lexical vector."""
    return list(vector[""] if isinstance(vector, dict) else vector)


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
        self._lexical: dict[str, bool] = {}  # whether each opened shard keeps the lexical vector

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
            lexical = self._lexical[collection]
            shard.update(edge.UpdateOperation.upsert_points(to_edge_points(points, lexical=lexical)))
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
        points = [Point(id=str(r.id), vector=dense_of(r.vector), payload=dict(r.payload or {})) for r in records]
        return points, None if next_start is None else str(next_start)

    def query(self, collection: str, request: StoreQuery) -> list[ScoredPayload]:
        shard = self._shard(collection)
        where = _since_filter(request.since)
        if request.lexical is None or not self._lexical[collection]:
            return _scored(shard.query(_nearest(request.dense, None, request.limit, where)))
        prefetches = [
            edge.Prefetch(limit=request.candidates, query=edge.Query.Nearest(vector, using=using), filter=where)
            for vector, using in _vectors(request)
        ]
        rrf = edge.Fusion.Rrf(k=RRF_K)
        fused = edge.QueryRequest(
            limit=request.limit,
            prefetches=prefetches,
            query=rrf,  # type: ignore[arg-type]  # the stubs list Fusion, not its variants
            filter=where,
            with_payload=True,
        )
        return _scored(shard.query(fused))

    def rankings(self, collection: str, request: StoreQuery) -> list[list[ScoredPayload]]:
        shard = self._shard(collection)
        where = _since_filter(request.since)
        wanted = _vectors(request) if self._lexical[collection] else _vectors(request)[:1]
        batch = edge.QueryBatchRequest([_nearest(vector, using, request.candidates, where) for vector, using in wanted])
        return [_scored(found) for found in shard.query_batch(batch)]

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
        self._note_lexical(collection)
        return shard

    def _note_lexical(self, collection: str) -> None:
        if collection in self._lexical:
            return
        warned = not all(self._lexical.values())  # once per store, not per collection
        self._lexical[collection] = has_lexical(self.path / collection)
        if not self._lexical[collection] and not warned:
            log.warning(
                "collections made before the lexical vector existed (this one, maybe others) are searched by "
                "meaning only until the next import run adds it (or `python -m importer migrate --qdrant-path`)",
                extra={"collection": collection, "store": str(self.path)},
            )


def _vectors(request: StoreQuery) -> list[tuple[Any, str | None]]:
    """The request's vectors and the names they are stored under: dense (unnamed) first, then lexical."""
    found: list[tuple[Any, str | None]] = [(request.dense, None)]
    if request.lexical is not None:
        found.append((_sparse(request.lexical), SPARSE_VECTOR))
    return found


def _nearest(vector: Any, using: str | None, limit: int, where: Any) -> Any:
    return edge.QueryRequest(
        limit=limit, query=edge.Query.Nearest(vector, using=using), filter=where, with_payload=True
    )


def _scored(found: list[Any]) -> list[ScoredPayload]:
    return [ScoredPayload(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in found]


def _since_filter(since: datetime | None) -> Any:
    if since is None:
        return None
    return edge.Filter(must=[edge.FieldCondition("timestamp", range=edge.RangeDateTime(gte=since.isoformat()))])


def _source_filter(source: str) -> Any:
    return edge.Filter(must=[edge.FieldCondition("source", match=edge.MatchValue(source))])
