"""Voyage AI embeddings through the official ``voyageai.AsyncClient``.

Why the official client: voyageai 0.5's ``AsyncClient`` takes ``base_url`` as a constructor argument
(tests point it at a local fake server) and a per-request ``timeout``. Its own retry loop only knows
429/502-504/timeouts and ignores ``Retry-After``, so it is switched off (``max_retries=0`` makes it try
exactly once) and this module retries with tenacity instead, so that retries are never multiplied.

The client opens a new aiohttp session (and TCP/TLS connection) per request unless the
``voyageai.aiosession`` context variable holds one; we set it to a session we own around each call so
connections are reused.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

import aiohttp
import voyageai
import voyageai.error as voyage_errors
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from importer.contract import ImporterEnv

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

API_KEY_ENV: Final = ImporterEnv.VOYAGE_API_KEY.value
DEFAULT_MODEL: Final = "voyage-3-large"
#: The API refuses lists longer than this.
MAX_TEXTS_PER_REQUEST: Final = 1000
#: Per-request token caps from Voyage's embeddings API reference.
REQUEST_TOKEN_LIMITS: Final[dict[str, int]] = {
    "voyage-4-lite": 1_000_000,
    "voyage-3.5-lite": 1_000_000,
    "voyage-3-lite": 1_000_000,
    "voyage-4": 320_000,
    "voyage-3.5": 320_000,
    "voyage-3": 320_000,
    "voyage-2": 320_000,
}
#: The smallest published cap (voyage-3-large, -4-large, code-3, finance-2, law-2, ...): safe for any model.
DEFAULT_REQUEST_TOKEN_LIMIT: Final = 120_000
#: Our token count is only an estimate, so requests are filled to this share of the cap.
TOKEN_BUDGET_SHARE: Final = 0.9
#: Vector sizes when no ``output_dimension`` is asked for.
NATIVE_DIMENSIONS: Final[dict[str, int]] = {
    "voyage-4-large": 1024,
    "voyage-4": 1024,
    "voyage-4-lite": 1024,
    "voyage-3-large": 1024,
    "voyage-3.5": 1024,
    "voyage-3.5-lite": 1024,
    "voyage-3": 1024,
    "voyage-3-lite": 512,
    "voyage-code-3": 1024,
    "voyage-finance-2": 1024,
    "voyage-law-2": 1024,
    "voyage-multilingual-2": 1024,
    "voyage-large-2-instruct": 1024,
    "voyage-large-2": 1536,
    "voyage-code-2": 1536,
    "voyage-2": 1024,
}
#: A server may ask for a long pause; waiting longer than this is more likely a misconfiguration.
MAX_RETRY_AFTER_SECONDS: Final = 300.0

_RETRYABLE_ERRORS: Final = (
    voyage_errors.RateLimitError,
    voyage_errors.ServerError,
    voyage_errors.ServiceUnavailableError,
    voyage_errors.Timeout,
    voyage_errors.APIConnectionError,
    voyage_errors.TryAgain,
    # Raised unwrapped if the connection breaks while the client reads the body.
    aiohttp.ClientError,
    TimeoutError,
)


class VoyageKeyMissingError(ValueError):
    """No API key was given and ``VOYAGE_API_KEY`` is unset or empty."""


class VoyageRequestError(RuntimeError):
    """Voyage AI refused a request, or did not answer it within the allowed attempts."""

    def __init__(self, message: str, *, status: int | None, attempts: int) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


def estimate_tokens(text: str) -> int:
    """A cheap, deliberately high token count.

    English runs at about 4-5 characters per token, so a third of the UTF-8 size over-counts it;
    counting bytes rather than characters keeps CJK text (about one token per character, three bytes)
    from being under-counted.
    """
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    return math.ceil(size / 3)


def plan_requests(
    texts: Sequence[str], *, max_texts: int = MAX_TEXTS_PER_REQUEST, token_budget: int
) -> list[tuple[int, int]]:
    """Cut ``texts`` into consecutive ``[start, stop)`` spans that each fit one request.

    A text estimated above the whole budget still gets a span of its own: it cannot be split here,
    and the API truncates over-long single inputs itself.
    """
    spans: list[tuple[int, int]] = []
    start, tokens = 0, 0
    for index, text in enumerate(texts):
        cost = estimate_tokens(text)
        span_full = index - start >= max_texts or tokens + cost > token_budget
        if index > start and span_full:
            spans.append((start, index))
            start, tokens = index, 0
        tokens += cost
    if start < len(texts):
        spans.append((start, len(texts)))
    return spans


def _normalise_base_url(base_url: str | None) -> str | None:
    """The client wants the API root including its version (``https://api.voyageai.com/v1``).

    A bare host (``https://api.voyageai.com``) is a likely setting, so it gets ``/v1`` added.
    """
    if base_url is None:
        return None
    trimmed = base_url.rstrip("/")
    return trimmed + "/v1" if urlsplit(trimmed).path == "" else trimmed


def _resolve_api_key(api_key: str | None) -> str:
    key = api_key or os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise VoyageKeyMissingError(
            f"Voyage AI needs an API key: set the {API_KEY_ENV} environment variable (or pass api_key=...)."
        )
    return key


def _http_status(error: BaseException) -> int | None:
    status = getattr(error, "http_status", None)
    return status if isinstance(status, int) else None


def _is_retryable(error: BaseException) -> bool:
    if isinstance(error, _RETRYABLE_ERRORS):
        return True
    # Unusual bodies make the client raise a plain APIError; judge those by their status.
    status = _http_status(error)
    return status is not None and (status == 429 or status >= 500)


def _describe(error: BaseException) -> str:
    """The service's own words when it gave any, else the client's, plus the HTTP status."""
    detail = str(error)
    if isinstance(error, voyage_errors.VoyageError):
        body = error.json_body
        service_detail = body.get("detail") if isinstance(body, dict) else None
        detail = str(service_detail or error.user_message or type(error).__name__)
        if error.__cause__ is not None:  # connection errors: the cause names the host and reason
            detail += f" ({error.__cause__})"
    status = _http_status(error)
    return f"HTTP {status}: {detail}" if status is not None else f"{type(error).__name__}: {detail}"


def _retry_after_seconds(error: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (``Retry-After`` as seconds or HTTP date), if any."""
    headers = getattr(error, "headers", None)
    if not headers:
        return None
    raw = headers.get("Retry-After") or headers.get("retry-after")
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(raw) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


async def _gather_in_order(jobs: Sequence[Awaitable[_T]]) -> list[_T]:
    """Run ``jobs`` concurrently; on the first failure cancel the rest and raise that failure."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class VoyageEmbedder:
    """The ``Embedder`` for Voyage AI's hosted models."""

    name = "voyage"
    #: Voyage models read 32k tokens, but one vector for a whole long conversation blurs its topics.
    #: 6,000 characters (about 1,500-2,000 tokens) holds a typical question with its answer, or a
    #: sizeable code excerpt, whole, while the vector still stands for one exchange.
    max_chars = 6_000
    #: 128 typical chunks (1-3k characters) make one or two requests under voyage-3-large's
    #: 120k-token cap, and the vectors of one call stay small (128 x 1024 floats).
    batch_size = 128
    #: Requests go out one call at a time.
    call_size = batch_size

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        max_retries: int = 6,
        timeout: float = 60.0,
        output_dimension: int | None = None,
        max_concurrent_requests: int = 4,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
    ) -> None:
        """``base_url``: API root, default Voyage's (or MongoDB's for ``al-`` keys).

        ``max_retries`` counts retries after the first attempt. ``output_dimension`` asks models
        that support it (voyage-3-large, -3.5, -4, code-3) for 256/512/1024/2048-d vectors.
        ``backoff_*`` shape the exponential pause between retries; a longer ``Retry-After`` wins.
        """
        self.model = model
        self.dimensions = self._dimensions_for(model, output_dimension)
        self._output_dimension = output_dimension
        self._max_retries = max_retries
        self._token_budget = int(REQUEST_TOKEN_LIMITS.get(model, DEFAULT_REQUEST_TOKEN_LIMIT) * TOKEN_BUDGET_SHARE)
        # Built from parts that exist in every tenacity >= 8.2 (``wait_exponential_jitter`` renamed its
        # argument in 9.x); the random part keeps parallel requests from retrying in lockstep.
        self._backoff = wait_exponential(multiplier=backoff_initial, max=backoff_max) + wait_random(0, backoff_initial)
        self._client = voyageai.AsyncClient(
            api_key=_resolve_api_key(api_key),
            max_retries=0,
            timeout=timeout,
            base_url=_normalise_base_url(base_url),
        )
        self._request_slots = asyncio.Semaphore(max_concurrent_requests)
        self._session: aiohttp.ClientSession | None = None
        #: Tokens Voyage reports having billed, for metrics and cost estimates.
        self.total_tokens = 0

    @staticmethod
    def _dimensions_for(model: str, output_dimension: int | None) -> int:
        if output_dimension is not None:
            return output_dimension
        if model not in NATIVE_DIMENSIONS:
            raise ValueError(
                f"Unknown Voyage model {model!r}: pass output_dimension= so the collection gets the "
                f"right vector size (known models: {', '.join(sorted(NATIVE_DIMENSIONS))})."
            )
        return NATIVE_DIMENSIONS[model]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed documents; several requests run concurrently and are reassembled in order."""
        for index, text in enumerate(texts):
            if not text:  # the API rejects empty strings; failing here names the culprit
                raise ValueError(f"Cannot embed an empty text (position {index} of {len(texts)}).")
        spans = plan_requests(texts, token_budget=self._token_budget)
        per_span = await _gather_in_order(
            [self._embed_request(list(texts[start:stop]), "document") for start, stop in spans]
        )
        return [vector for vectors in per_span for vector in vectors]

    async def embed_query(self, text: str) -> list[float]:
        if not text:
            raise ValueError("Cannot embed an empty query.")
        (vector,) = await self._embed_request([text], "query")
        return vector

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _embed_request(self, texts: list[str], input_type: str) -> list[list[float]]:
        """One API request, retried on rate limits, server errors, timeouts and broken connections."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_retries + 1),
            wait=self._wait_before_retry,
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._log_retry,
        )
        async with self._request_slots:
            try:
                async for attempt in retrying:
                    with attempt:
                        return await self._post(texts, input_type)
            except RetryError as exhausted:
                raise self._exhausted_error(exhausted) from exhausted.last_attempt.exception()
            except voyage_errors.VoyageError as refused:
                raise VoyageRequestError(
                    f"Voyage AI refused the embeddings request ({_describe(refused)})",
                    status=_http_status(refused),
                    attempts=1,
                ) from refused
        raise AssertionError("unreachable: tenacity either returns, retries or raises")

    async def _post(self, texts: list[str], input_type: str) -> list[list[float]]:
        token = voyageai.aiosession.set(self._shared_session())
        try:
            result = await self._client.embed(
                texts,
                model=self.model,
                input_type=input_type,
                truncation=True,
                output_dimension=self._output_dimension,
            )
        finally:
            voyageai.aiosession.reset(token)
        self.total_tokens += result.total_tokens
        return self._checked_vectors(result.embeddings, len(texts))

    def _shared_session(self) -> aiohttp.ClientSession:
        # Created lazily: an aiohttp session belongs to the event loop that is running when it is made.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _checked_vectors(self, vectors: Sequence[Sequence[Any]], expected: int) -> list[list[float]]:
        """Refuse answers that would silently misalign chunks and vectors or break the collection."""
        if len(vectors) != expected:
            raise VoyageRequestError(
                f"Voyage AI returned {len(vectors)} vectors for {expected} texts", status=None, attempts=1
            )
        wrong_size = next((len(v) for v in vectors if len(v) != self.dimensions), None)
        if wrong_size is not None:
            raise VoyageRequestError(
                f"Voyage AI returned {wrong_size}-d vectors from {self.model}, expected {self.dimensions}",
                status=None,
                attempts=1,
            )
        # We never ask for integer output types, so the values are floats.
        return cast(list[list[float]], list(vectors))

    def _wait_before_retry(self, retry_state: RetryCallState) -> float:
        backoff = self._backoff(retry_state)
        error = retry_state.outcome.exception() if retry_state.outcome else None
        requested = _retry_after_seconds(error)
        return backoff if requested is None else max(backoff, requested)

    def _log_retry(self, retry_state: RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        pause = retry_state.next_action.sleep if retry_state.next_action else 0.0
        logger.warning(
            "Voyage AI request failed (attempt %d of %d, %s); retrying in %.1f s",
            retry_state.attempt_number,
            self._max_retries + 1,
            _describe(error) if error else "no error",
            pause,
        )

    def _exhausted_error(self, exhausted: RetryError) -> VoyageRequestError:
        attempts = exhausted.last_attempt.attempt_number
        last = exhausted.last_attempt.exception()
        last_text = _describe(last) if last else "no error recorded"
        return VoyageRequestError(
            f"Voyage AI embeddings request failed after {attempts} attempts "
            f"(1 + {attempts - 1} retries); last error: {last_text}",
            status=_http_status(last) if last else None,
            attempts=attempts,
        )
