"""A FAKE of Voyage AI's embeddings endpoint, for tests only: real HTTP on 127.0.0.1, made-up vectors.

It speaks the wire format the official client uses (``POST /v1/embeddings``, bearer key, base64 or
JSON-list vectors, ``{"detail": ...}`` errors) and enforces the documented request limits (1,000 texts,
a token cap, no empty strings), so a client that forgets to split its batches is refused as it would
be by the real service. Its token count is an approximation, not Voyage's tokenizer.

Usage::

    async with FakeVoyageServer(failures=[FakeFailure(429, retry_after="0.2")]) as fake:
        embedder = VoyageEmbedder(api_key=FAKE_API_KEY, base_url=fake.base_url)
        ...
        assert len(fake.requests) == 2

Scripted failures are answered one per request, in order; after them every request succeeds,
unless ``fail_forever`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
from aiohttp import web

FAKE_API_KEY = "fake-voyage-key"
#: The fake's approximation of Voyage's tokenizer: about four characters per token.
FAKE_CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class FakeFailure:
    """One scripted error answer."""

    status: int
    detail: str = "scripted failure from the fake Voyage server"
    retry_after: str | None = None
    #: Seconds to stall before answering, e.g. to run past the client's timeout.
    delay: float = 0.0


@dataclass(frozen=True)
class RecordedRequest:
    received_at: float  # time.monotonic()
    path: str
    authorization: str | None
    body: dict[str, Any]

    @property
    def texts(self) -> list[str]:
        raw = self.body.get("input")
        return [raw] if isinstance(raw, str) else list(raw or [])


def fake_token_count(text: str) -> int:
    return math.ceil(len(text) / FAKE_CHARS_PER_TOKEN)


def fake_vector(text: str, dimensions: int) -> list[float]:
    """The vector the fake returns for ``text``: derived from its hash, exact in float32."""
    return [float(v) for v in _fake_array(text, dimensions)]


def _fake_array(text: str, dimensions: int) -> np.ndarray:
    digest = hashlib.shake_128(text.encode("utf-8")).digest(dimensions)
    return (np.frombuffer(digest, dtype=np.uint8).astype("<f4") - 128.0) / 128.0


class FakeVoyageServer:
    """Serves ``POST /v1/embeddings`` on a free loopback port while used as ``async with``."""

    def __init__(
        self,
        *,
        failures: Iterable[FakeFailure] = (),
        fail_forever: FakeFailure | None = None,
        api_key: str = FAKE_API_KEY,
        dimensions: int = 1024,
        max_inputs: int = 1000,
        token_limit: int = 120_000,
    ) -> None:
        self._failures: deque[FakeFailure] = deque(failures)
        self.fail_forever = fail_forever
        self.api_key = api_key
        self.dimensions = dimensions
        self.max_inputs = max_inputs
        self.token_limit = token_limit
        self.requests: list[RecordedRequest] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """The API root as Voyage's client expects it (with ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def fail_next(self, *failures: FakeFailure) -> None:
        self._failures.extend(failures)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", self._handle_embeddings)
        # A short shutdown timeout: a handler stalled by ``delay`` must not hold up the test's end.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeVoyageServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _handle_embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(
            RecordedRequest(time.monotonic(), request.path, request.headers.get("Authorization"), body)
        )
        failure = self._failures.popleft() if self._failures else self.fail_forever
        if failure is not None:
            return await self._fail(failure)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Provided API key is invalid.")
        problem = self._invalid_request(body)
        if problem:
            return _error(400, problem)
        return web.json_response(self._success(body))

    async def _fail(self, failure: FakeFailure) -> web.Response:
        if failure.delay:
            await asyncio.sleep(failure.delay)
        headers = {"Retry-After": failure.retry_after} if failure.retry_after else None
        return _error(failure.status, failure.detail, headers)

    def _invalid_request(self, body: dict[str, Any]) -> str | None:
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not body.get("model"):
            return "Request needs 'input' (a string or non-empty list) and 'model'."
        if len(texts) > self.max_inputs:
            return f"The batch size limit is {self.max_inputs}. Your batch size is {len(texts)}."
        if any(not isinstance(t, str) or not t for t in texts):
            return "Input texts must be non-empty strings."
        tokens = sum(fake_token_count(t) for t in texts)
        if tokens > self.token_limit:
            return f"Request has {tokens} tokens; the limit per request is {self.token_limit}."
        return None

    def _success(self, body: dict[str, Any]) -> dict[str, Any]:
        raw = body["input"]
        texts = [raw] if isinstance(raw, str) else raw
        dimensions = body.get("output_dimension") or self.dimensions
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {"object": "embedding", "embedding": _encode(_fake_array(t, dimensions), as_base64), "index": i}
            for i, t in enumerate(texts)
        ]
        usage = {"total_tokens": sum(fake_token_count(t) for t in texts)}
        return {"object": "list", "data": data, "model": body["model"], "usage": usage}


def _encode(vector: np.ndarray, as_base64: bool) -> str | list[float]:
    """Base64 of little-endian float32, as the real service does when the client asks for it."""
    if not as_base64:
        return [float(v) for v in vector]
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps({"detail": detail}), content_type="application/json", headers=headers
    )
