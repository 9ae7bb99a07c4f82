"""Qdrant: one collection per project and provider, deterministic point ids, retried writes.

The client is synchronous and used from one dedicated thread: the embedded store (``path=``) is plain
Python that would otherwise block the event loop, and a server's HTTP calls then never stall embedding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
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

from importer.points import collection_name

log = logging.getLogger(__name__)

INDEXED_FIELDS: dict[str, models.PayloadSchemaType] = {
    "conversation_id": models.PayloadSchemaType.KEYWORD,
    "project": models.PayloadSchemaType.KEYWORD,
    "timestamp": models.PayloadSchemaType.DATETIME,
    "source": models.PayloadSchemaType.KEYWORD,
}


class QdrantUnavailable(RuntimeError):
    """Qdrant kept failing after every retry."""


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, UnexpectedResponse):
        return error.status_code is None or error.status_code == 429 or error.status_code >= 500
    return isinstance(error, ResponseHandlingException | httpx.TransportError | ConnectionError | TimeoutError)


class QdrantSink:
    def __init__(
        self, client: QdrantClient, *, suffix: str, dimensions: int, embedded: bool, attempts: int = 6
    ) -> None:
        self.client = client
        self.suffix = suffix
        self.dimensions = dimensions
        self.attempts = attempts
        self._ready: set[str] = set()
        self.where = "embedded store" if embedded else "server"

    @classmethod
    def connect(
        cls,
        *,
        url: str | None,
        path: Path | None,
        api_key: str | None,
        suffix: str,
        dimensions: int,
        attempts: int = 6,
    ) -> QdrantSink:
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            # Calls come from worker threads, one at a time (the pipeline awaits each), so sqlite's
            # same-thread check only gets in the way.
            client = QdrantClient(path=str(path), force_disable_check_same_thread=True)
        else:
            client = QdrantClient(url=url, api_key=api_key, timeout=30)
        return cls(client, suffix=suffix, dimensions=dimensions, embedded=path is not None, attempts=attempts)

    def collection_for(self, project: str) -> str:
        return collection_name(project, self.suffix)

    def upsert(self, collection: str, points: Sequence[models.PointStruct]) -> None:
        self._retry(self._ensure_collection, collection)
        self._retry(self.client.upsert, collection_name=collection, points=list(points), wait=True)

    def delete_source(self, collection: str, source: str) -> None:
        """Delete every point of one file (before it is imported again from its start)."""
        if not self._retry(self.client.collection_exists, collection):
            return
        selector = models.FilterSelector(
            filter=models.Filter(must=[models.FieldCondition(key="source", match=models.MatchValue(value=source))])
        )
        self._retry(self.client.delete, collection_name=collection, points_selector=selector, wait=True)

    def close(self) -> None:
        self.client.close()

    def _ensure_collection(self, collection: str) -> None:
        if collection in self._ready:
            return
        if not self.client.collection_exists(collection):
            try:
                self.client.create_collection(
                    collection,
                    vectors_config=models.VectorParams(size=self.dimensions, distance=models.Distance.COSINE),
                )
            except (UnexpectedResponse, ValueError) as error:
                # Another run may have created it in the meantime; anything else is re-raised below.
                if not self.client.collection_exists(collection):
                    raise error
        if self.where == "server":
            # The embedded store has no payload indexes (it scans); a server needs them for filters.
            for field, schema in INDEXED_FIELDS.items():
                self.client.create_payload_index(collection, field_name=field, field_schema=schema, wait=True)
        self._ready.add(collection)

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


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("qdrant call failed, retrying", extra={"attempt": state.attempt_number, "error": repr(error)})
