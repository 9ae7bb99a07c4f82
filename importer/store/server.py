"""A Qdrant server through qdrant-client: one collection per project and provider, retried calls.

The client is synchronous and used from one dedicated thread at a time, so a server's HTTP calls never
stall embedding. This module is imported only when a server is used (or by a migration or an export).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity import Retrying as _Retrying

from importer.lexical import SPARSE_VECTOR, Sparse, document_vector
from importer.points import collection_name
from importer.store import INDEXED_FIELDS, RRF_K, Point, QdrantUnavailable, ScoredPayload, StoreQuery

log = logging.getLogger(__name__)

_SCHEMAS = {"keyword": models.PayloadSchemaType.KEYWORD, "datetime": models.PayloadSchemaType.DATETIME}


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, UnexpectedResponse):
        return error.status_code is None or error.status_code == 429 or error.status_code >= 500
    return isinstance(error, ResponseHandlingException | httpx.TransportError | ConnectionError | TimeoutError)


def _source_filter(source: str) -> models.Filter:
    return models.Filter(must=[models.FieldCondition(key="source", match=models.MatchValue(value=source))])


class ServerSink:
    where = "server"

    def __init__(self, client: QdrantClient, *, suffix: str, attempts: int = 6) -> None:
        self.client = client
        self.suffix = suffix
        self.attempts = attempts
        self._ready: set[str] = set()
        self._lexical: dict[str, bool] = {}  # whether each collection seen keeps the lexical vector

    @classmethod
    def connect(cls, *, url: str | None, api_key: str | None, suffix: str, attempts: int = 6) -> ServerSink:
        client = QdrantClient(url=url, api_key=api_key, timeout=30)
        return cls(client, suffix=suffix, attempts=attempts)

    def collection_for(self, project: str) -> str:
        return collection_name(project, self.suffix)

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if not points:
            return
        self._retry(self._ensure_collection, collection, len(points[0].vector))
        structs = [models.PointStruct(id=p.id, vector=self._vector(collection, p), payload=p.payload) for p in points]
        self._retry(self.client.upsert, collection_name=collection, points=structs, wait=True)

    def delete_source(self, collection: str, source: str) -> None:
        if not self._retry(self.client.collection_exists, collection):
            return
        selector = models.FilterSelector(filter=_source_filter(source))
        self._retry(self.client.delete, collection_name=collection, points_selector=selector, wait=True)

    def collections(self) -> list[str]:
        found = self._retry(self.client.get_collections).collections
        return sorted(c.name for c in found if c.name.endswith(f"_{self.suffix}"))

    def count(self, collection: str, source: str | None = None) -> int:
        condition = _source_filter(source) if source is not None else None
        return int(self._retry(self.client.count, collection, count_filter=condition, exact=True).count)

    def scroll(self, collection: str, *, start: str | None, limit: int) -> tuple[list[Point], str | None]:
        records, next_start = self._retry(
            self.client.scroll, collection, offset=start, limit=limit, with_payload=True, with_vectors=True
        )
        points = [Point(id=str(r.id), vector=_dense(r.vector), payload=dict(r.payload or {})) for r in records]
        return points, None if next_start is None else str(next_start)

    def query(self, collection: str, request: StoreQuery) -> list[ScoredPayload]:
        where = _since_filter(request.since)
        if request.lexical is None or not self._has_lexical(collection):
            found = self._retry(
                self.client.query_points,
                collection,
                query=request.dense,
                query_filter=where,
                limit=request.limit,
                with_payload=True,
            )
            return _scored(found.points)
        prefetch = [
            models.Prefetch(query=vector, using=using, limit=request.candidates, filter=where)
            for vector, using in _vectors(request)
        ]
        found = self._retry(
            self.client.query_points,
            collection,
            prefetch=prefetch,
            query=models.RrfQuery(rrf=models.Rrf(k=RRF_K)),
            query_filter=where,
            limit=request.limit,
            with_payload=True,
        )
        return _scored(found.points)

    def rankings(self, collection: str, request: StoreQuery) -> list[list[ScoredPayload]]:
        where = _since_filter(request.since)
        wanted = _vectors(request) if self._has_lexical(collection) else _vectors(request)[:1]
        requests = [
            models.QueryRequest(query=vector, using=using, filter=where, limit=request.candidates, with_payload=True)
            for vector, using in wanted
        ]
        found = self._retry(self.client.query_batch_points, collection, requests=requests)
        return [_scored(response.points) for response in found]

    def finish(self) -> None:
        """A server builds its own index in the background."""

    def close(self) -> None:
        self.client.close()

    def _ensure_collection(self, collection: str, dimensions: int) -> None:
        if collection in self._ready:
            return
        if not self.client.collection_exists(collection):
            try:
                self.client.create_collection(
                    collection,
                    vectors_config=models.VectorParams(size=dimensions, distance=models.Distance.COSINE),
                    sparse_vectors_config={SPARSE_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)},
                )
            except (UnexpectedResponse, ValueError) as error:
                # Another run may have created it in the meantime; anything else is re-raised below.
                if not self.client.collection_exists(collection):
                    raise error
        for field, kind in INDEXED_FIELDS.items():
            self.client.create_payload_index(collection, field_name=field, field_schema=_SCHEMAS[kind], wait=True)
        self._ready.add(collection)

    def _vector(self, collection: str, point: Point) -> Any:
        """The dense vector, and beside it the text's BM25 vector where the collection keeps one."""
        if not self._has_lexical(collection):
            return point.vector
        lexical = _sparse(document_vector(str(point.payload.get("text", ""))))
        return {"": point.vector, SPARSE_VECTOR: lexical}

    def _has_lexical(self, collection: str) -> bool:
        if collection not in self._lexical:
            info = self._retry(self.client.get_collection, collection)
            self._lexical[collection] = SPARSE_VECTOR in (info.config.params.sparse_vectors or {})
            if not self._lexical[collection]:
                log.warning(
                    "this collection was made before the lexical vector existed: it is searched by meaning "
                    "only, and its new points get no lexical vector; to add it, import again into a new collection",
                    extra={"collection": collection},
                )
        return self._lexical[collection]

    def _retry(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        retrying = _Retrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=0.5, max=10) + wait_random(0, 0.5),
            retry=retry_if_exception(_is_transient),
            before_sleep=_log_retry,
            reraise=False,
            retry_error_callback=self._give_up,
        )
        return retrying(call, *args, **kwargs)

    def _give_up(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        raise QdrantUnavailable(
            f"Qdrant ({self.where}) failed {state.attempt_number} times; last error: {error!r}"
        ) from error


def _vectors(request: StoreQuery) -> list[tuple[Any, str | None]]:
    """The request's vectors and the names they are stored under: dense (unnamed) first, then lexical."""
    found: list[tuple[Any, str | None]] = [(request.dense, None)]
    if request.lexical is not None:
        found.append((_sparse(request.lexical), SPARSE_VECTOR))
    return found


def _sparse(vector: Sparse) -> models.SparseVector:
    return models.SparseVector(indices=vector.indices, values=vector.values)


def _dense(vector: Any) -> list[float]:
    """The dense vector of a record: the whole vector, or the unnamed one beside the lexical vector."""
    return list(vector[""] if isinstance(vector, dict) else vector)


def _scored(found: list[models.ScoredPoint]) -> list[ScoredPayload]:
    return [ScoredPayload(id=str(p.id), score=p.score, payload=dict(p.payload or {})) for p in found]


def _since_filter(since: datetime | None) -> models.Filter | None:
    if since is None:
        return None
    return models.Filter(must=[models.FieldCondition(key="timestamp", range=models.DatetimeRange(gte=since))])


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("qdrant call failed, retrying", extra={"attempt": state.attempt_number, "error": repr(error)})
