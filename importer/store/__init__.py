"""Where points are kept: an embedded store on disk (Qdrant Edge) or a Qdrant server (qdrant-client).

Both sides speak the same small interface, with the same collection names, point ids and payloads, so a
store moves to a server (``python -m importer export-to-server``) without re-embedding anything.
Nothing here imports qdrant-client: only a server, a migration or an export needs it (its import alone
costs ~115 MB of RSS and seconds of start-up).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from importer.lexical import Sparse

#: Payload fields with an index, and their kind: filters on them stay fast as a collection grows.
INDEXED_FIELDS: dict[str, str] = {
    "conversation_id": "keyword",
    "project": "keyword",
    "timestamp": "datetime",
    "source": "keyword",
}


@dataclass(frozen=True, slots=True)
class Point:
    id: str
    vector: list[float]
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ScoredPayload:
    id: str
    score: float
    payload: dict[str, Any]


#: Reciprocal-rank fusion's k: the hit at position p (0 for the first) of a ranking scores 1 / (RRF_K + p).
#: Not the common 60: that flattens the first places so much that a moment only one ranking finds (the
#: model's first hit, its words unlike the query's) loses to any pair of middling places. On the retrieval
#: benchmark's development set (bench/retrieval_bench.py, 57 queries), the same rankings of five imports
#: (chunked five ways) fused with k = 10 instead of 60 found the moment in the top 10 for 0.88-0.89 of the
#: queries instead of 0.82-0.86; in the top 5 and the right session first, never less often.
RRF_K = 10


@dataclass(frozen=True, slots=True)
class StoreQuery:
    """One search as a store runs it."""

    dense: list[float]
    #: The query's BM25 terms; None: by meaning only.
    lexical: Sparse | None
    limit: int
    #: How many hits each ranking (dense, lexical) contributes to the fusion.
    candidates: int
    #: Only points whose ``timestamp`` is at or after this instant (the payload's datetime index).
    since: datetime | None = None


class StoreError(RuntimeError):
    """The store cannot be used as asked; the message says why and what to do."""


class StoreMissing(StoreError):
    """Search or export was pointed at a store that does not exist."""


class StoreBusy(StoreError):
    """Another process holds the embedded store."""


class QdrantUnavailable(StoreError):
    """Qdrant kept failing after every retry."""


class Sink(Protocol):
    """What the importer writes through, and what search and export read through."""

    suffix: str
    where: str

    def collection_for(self, project: str) -> str: ...

    def upsert(self, collection: str, points: Sequence[Point]) -> None: ...

    def delete_source(self, collection: str, source: str) -> None:
        """Delete every point of one file (before it is imported again from its start)."""

    def collections(self) -> list[str]:
        """Every collection of this provider (name ends with ``_<suffix>``)."""

    def count(self, collection: str, source: str | None = None) -> int: ...

    def scroll(self, collection: str, *, start: str | None, limit: int) -> tuple[list[Point], str | None]:
        """Up to ``limit`` points in id order from id ``start`` on (None: the first); and the id the next page
        starts at (None: this was the last page)."""

    def query(self, collection: str, request: StoreQuery) -> list[ScoredPayload]:
        """The store's own ranking: dense and lexical fused by RRF (prefetch + fusion in one query), or the
        dense one alone when the request or the collection has no lexical vector."""

    def rankings(self, collection: str, request: StoreQuery) -> list[list[ScoredPayload]]:
        """The dense ranking and, when both have one, the lexical ranking, ``request.candidates`` each (one
        batch): for fusing over several collections, where per-collection fused scores do not compare."""

    def finish(self) -> None:
        """End of a run that wrote: build what makes later queries fast, where it pays."""

    def close(self) -> None: ...


def open_sink(
    *,
    url: str | None,
    path: Path | None,
    api_key: str | None,
    suffix: str,
    attempts: int = 6,
    for_writing: bool = True,
    index_min_points: int = 0,
) -> Sink:
    """The embedded store at ``path`` or the server at ``url`` (exactly one is given)."""
    if path is not None:
        from importer.store.edge import EdgeStore

        return EdgeStore.open(path, suffix=suffix, for_writing=for_writing, index_min_points=index_min_points)
    from importer.store.server import ServerSink

    return ServerSink.connect(url=url, api_key=api_key, suffix=suffix, attempts=attempts)


def fuse(rankings: Sequence[Sequence[ScoredPayload]], limit: int) -> list[ScoredPayload]:
    """Reciprocal-rank fusion, as Qdrant computes it: each hit scores the sum of 1 / (RRF_K + its position)."""
    scores: dict[str, float] = {}
    found: dict[str, ScoredPayload] = {}
    for ranking in rankings:
        for position, hit in enumerate(ranking):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1 / (RRF_K + position)
            found.setdefault(hit.id, hit)
    best = sorted(scores, key=lambda id_: scores[id_], reverse=True)[:limit]
    return [ScoredPayload(id=id_, score=scores[id_], payload=found[id_].payload) for id_ in best]


def all_points(sink: Sink, collection: str, page: int = 256) -> Iterator[list[Point]]:
    """Every point of a collection, a page at a time (memory stays bounded by ``page``)."""
    start: str | None = None
    while True:
        points, start = sink.scroll(collection, start=start, limit=page)
        if points:
            yield points
        if start is None:
            return
