"""VoyageEmbedder against a fake Voyage server: real HTTP over loopback through the official client."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from importer.embed.base import Embedder
from importer.embed.voyage import (
    VoyageEmbedder,
    VoyageKeyMissingError,
    VoyageRequestError,
    estimate_tokens,
    plan_requests,
)
from tests.importer.embed.fake_voyage import (
    FAKE_API_KEY,
    FakeFailure,
    FakeVoyageServer,
    fake_token_count,
    fake_vector,
)
from tests.importer.stored import stored_points

MakeEmbedder = Callable[..., VoyageEmbedder]


@pytest.fixture
async def fake_voyage() -> AsyncIterator[FakeVoyageServer]:
    async with FakeVoyageServer() as server:
        yield server


@pytest.fixture
async def make_embedder(fake_voyage: FakeVoyageServer) -> AsyncIterator[MakeEmbedder]:
    """Embedders aimed at the fake, with tiny backoff so retry tests stay fast; closed afterwards."""
    made: list[VoyageEmbedder] = []

    def make(**overrides: Any) -> VoyageEmbedder:
        settings: dict[str, Any] = {
            "api_key": FAKE_API_KEY,
            "base_url": fake_voyage.base_url,
            "backoff_initial": 0.01,
            "backoff_max": 0.05,
            "timeout": 5.0,
        }
        embedder = VoyageEmbedder(**(settings | overrides))
        made.append(embedder)
        return embedder

    yield make
    for embedder in made:
        await embedder.aclose()


@pytest.fixture
def unused_port() -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port


def test_satisfies_embedder_protocol_with_documented_defaults() -> None:
    embedder: Embedder = VoyageEmbedder(api_key="k")
    assert (embedder.name, embedder.dimensions) == ("voyage", 1024)
    assert 4_000 <= embedder.max_chars <= 8_000
    assert embedder.batch_size == 128


def test_dimensions_follow_model_or_output_dimension() -> None:
    assert VoyageEmbedder("voyage-3-lite", api_key="k").dimensions == 512
    assert VoyageEmbedder("voyage-3-large", api_key="k", output_dimension=2048).dimensions == 2048
    with pytest.raises(ValueError, match="output_dimension"):
        VoyageEmbedder("voyage-99", api_key="k")


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOYAGE_API_KEY", raising=False)
    with pytest.raises(VoyageKeyMissingError, match="VOYAGE_API_KEY"):
        VoyageEmbedder()
    monkeypatch.setenv("VOYAGE_API_KEY", "  ")
    with pytest.raises(VoyageKeyMissingError, match="VOYAGE_API_KEY"):
        VoyageEmbedder()


def test_plan_requests_respects_count_and_budget() -> None:
    assert plan_requests(["a"] * 2500, token_budget=10**6) == [(0, 1000), (1000, 2000), (2000, 2500)]
    # 30 chars = 10 estimated tokens each; 25 tokens fit two texts.
    assert plan_requests(["x" * 30] * 5, token_budget=25) == [(0, 2), (2, 4), (4, 5)]
    # A text over the whole budget still travels, alone.
    assert plan_requests(["x" * 300, "y"], token_budget=25) == [(0, 1), (1, 2)]
    assert plan_requests([], token_budget=25) == []


def test_token_estimate_does_not_undercount_cjk() -> None:
    assert estimate_tokens("abcdef") == 2
    assert estimate_tokens("日本語のテキスト") >= len("日本語のテキスト")


async def test_key_from_environment_and_bare_host_url(
    fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOYAGE_API_KEY", FAKE_API_KEY)
    embedder = make_embedder(api_key=None, base_url=f"http://127.0.0.1:{fake_voyage.port}")
    assert await embedder.embed(["hello"]) == [fake_vector("hello", 1024)]
    assert fake_voyage.requests[0].authorization == f"Bearer {FAKE_API_KEY}"


async def test_splits_over_1000_texts_and_keeps_order(
    fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder
) -> None:
    texts = [f"chunk number {i}" for i in range(2500)]
    vectors = await make_embedder().embed(texts)

    assert vectors == [fake_vector(t, 1024) for t in texts]
    assert sorted(len(r.texts) for r in fake_voyage.requests) == [500, 1000, 1000]
    first = fake_voyage.requests[0].body
    assert (first["model"], first["input_type"], first["truncation"]) == ("voyage-3-large", "document", True)


async def test_token_heavy_batch_is_split_by_budget(fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder) -> None:
    # 50 x 12,000 chars is 150k tokens by the fake's count: one request would be refused (120k cap).
    texts = [f"{i:04d}" + "word " * 2400 for i in range(50)]
    vectors = await make_embedder().embed(texts)

    assert vectors == [fake_vector(t, 1024) for t in texts]
    assert len(fake_voyage.requests) >= 2
    for request in fake_voyage.requests:
        assert sum(fake_token_count(t) for t in request.texts) <= fake_voyage.token_limit
        assert sum(estimate_tokens(t) for t in request.texts) <= 108_000


async def test_query_uses_query_input_type(fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder) -> None:
    vector = await make_embedder().embed_query("how did we fix the flaky test?")
    assert vector == fake_vector("how did we fix the flaky test?", 1024)
    assert fake_voyage.requests[0].body["input_type"] == "query"


async def test_output_dimension_is_sent(fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder) -> None:
    vectors = await make_embedder(output_dimension=256).embed(["a", "b"])
    assert [len(v) for v in vectors] == [256, 256]
    assert fake_voyage.requests[0].body["output_dimension"] == 256


async def test_retry_after_then_503_then_success(fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder) -> None:
    fake_voyage.fail_next(FakeFailure(429, "slow down", retry_after="0.2"), FakeFailure(503))
    vectors = await make_embedder().embed(["a", "b"])

    assert vectors == [fake_vector("a", 1024), fake_vector("b", 1024)]
    first, second, third = fake_voyage.requests
    # Backoff is ~0.01-0.02 s here, so this pause can only come from Retry-After.
    assert second.received_at - first.received_at >= 0.2
    assert third.texts == ["a", "b"]


async def test_persistent_503_fails_after_max_retries(
    fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder
) -> None:
    fake_voyage.fail_forever = FakeFailure(503, "overloaded")
    with pytest.raises(VoyageRequestError, match=r"after 3 attempts.*HTTP 503") as failure:
        await make_embedder(max_retries=2).embed(["a"])

    # Exactly 3: the client's own retries are off, so they do not multiply ours.
    assert len(fake_voyage.requests) == 3
    assert (failure.value.status, failure.value.attempts) == (503, 3)


async def test_bad_key_fails_at_once_with_service_message(
    fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder
) -> None:
    with pytest.raises(VoyageRequestError, match=r"HTTP 401: Provided API key is invalid") as failure:
        await make_embedder(api_key="wrong-key").embed(["a"])
    assert len(fake_voyage.requests) == 1
    assert failure.value.status == 401


async def test_bad_request_is_not_retried(fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder) -> None:
    fake_voyage.fail_next(FakeFailure(400, "Model voyage-nope is not supported."))
    with pytest.raises(VoyageRequestError, match="voyage-nope is not supported"):
        await make_embedder().embed(["a"])
    assert len(fake_voyage.requests) == 1


async def test_timeout_is_retried(fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder) -> None:
    fake_voyage.fail_next(FakeFailure(503, delay=0.6))
    vectors = await make_embedder(timeout=0.2).embed(["a"])
    assert vectors == [fake_vector("a", 1024)]
    assert len(fake_voyage.requests) == 2


async def test_connection_refused_is_retried_then_reported(unused_port: int) -> None:
    embedder = VoyageEmbedder(
        api_key="k", base_url=f"http://127.0.0.1:{unused_port}/v1", max_retries=1, backoff_initial=0.01
    )
    try:
        with pytest.raises(VoyageRequestError, match=r"after 2 attempts.*APIConnectionError"):
            await embedder.embed(["a"])
    finally:
        await embedder.aclose()


async def test_empty_text_is_refused_before_sending(fake_voyage: FakeVoyageServer, make_embedder: MakeEmbedder) -> None:
    with pytest.raises(ValueError, match="position 1"):
        await make_embedder().embed(["a", ""])
    assert fake_voyage.requests == []
    assert await make_embedder().embed([]) == []


async def test_the_importer_runs_on_voyage_through_throttling(
    fake_voyage: FakeVoyageServer, real_sessions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole importer with ``--provider voyage``: the service throttles, then fails once, then answers."""
    from importer.runner import run_import
    from importer.settings import Settings

    monkeypatch.setenv("VOYAGE_API_KEY", FAKE_API_KEY)
    fake_voyage.fail_next(FakeFailure(429, retry_after="0.2"), FakeFailure(503))
    source = tmp_path / "projects" / "-test"
    source.mkdir(parents=True)
    for path in real_sessions.glob("*.jsonl"):
        (source / path.name).write_bytes(path.read_bytes())
    settings = Settings(
        source=source.parent,
        qdrant_path=tmp_path / "qdrant",
        state_file=tmp_path / "state.json",
        provider="voyage",
        voyage_base_url=fake_voyage.base_url,
    )
    settings.validate()
    stats = await run_import(settings)
    assert stats.files == 3 and stats.chunks > 0
    assert len(fake_voyage.requests) >= 3  # the two failures were retried
    ((collection, points),) = stored_points(tmp_path / "qdrant", suffix="voyage").items()
    assert collection.endswith("_voyage")
    assert {len(point.vector) for point in points} == {1024}
    assert len(points) == stats.chunks
