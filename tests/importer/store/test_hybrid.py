"""Hybrid retrieval in both stores: a BM25 vector beside the dense one, fused by the store (prefetch + RRF).

The embedded store is the real Qdrant Edge engine; no Qdrant server can run here, so qdrant-client's local
mode stands in for one, through the very ServerSink a server URL gets. Dense vectors come from the real model.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import qdrant_edge as edge
from qdrant_client import QdrantClient, models

from importer.embed.local import LocalEmbedder
from importer.lexical import query_vector
from importer.points import collection_name
from importer.store import Point, Sink, StoreQuery, all_points, fuse, legacy
from importer.store.edge import EdgeStore, has_lexical, to_edge_points
from importer.store.export import export
from importer.store.legacy import LEXICAL_STAGING
from importer.store.server import ServerSink

COLLECTION = collection_name("app", "local")
TEXTS = [
    "User: the build fails with ERR_OSSL_EVP_UNSUPPORTED after upgrading node",
    "Assistant: set NODE_OPTIONS=--openssl-legacy-provider, or move webpack to version 5",
    "User: why did we pick the second approach for caching the sessions",
    "Assistant: because the first one kept every session in memory and the pod was killed",
    "User: the login page looks blank in Safari",
    "Assistant: Safari blocks third-party cookies; serve the page from the same domain",
    "User: how do I make the flaky test stable",
    "Assistant: run pytest with -p no:randomly to see whether the order matters",
]


@pytest.fixture(scope="module")
def embedder(model_dir: Path) -> Iterator[LocalEmbedder]:
    yield LocalEmbedder(model_dir, threads=1)


def _points(embedder: LocalEmbedder) -> list[Point]:
    vectors = embedder.embed_now(TEXTS)
    return [
        Point(
            id=str(uuid.uuid5(uuid.NAMESPACE_OID, text)),
            vector=vector,
            payload={"text": text, "chunk_index": i, "timestamp": f"2025-0{1 + i % 2}-15T10:00:00Z"},
        )
        for i, (text, vector) in enumerate(zip(TEXTS, vectors, strict=True))
    ]


def _edge(path: Path) -> EdgeStore:
    return EdgeStore.open(path / "edge", suffix="local")


def _stand_in_server(path: Path) -> ServerSink:
    return ServerSink(QdrantClient(path=str(path / "server")), suffix="local", attempts=1)


STORES: dict[str, Callable[[Path], Sink]] = {
    "edge": _edge,
    "server stand-in (qdrant-client local mode)": _stand_in_server,
}


@pytest.fixture(params=list(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    sink = STORES[request.param](tmp_path)
    yield sink
    sink.close()


async def _request(embedder: LocalEmbedder, query: str, *, since: datetime | None = None) -> StoreQuery:
    dense = await embedder.embed_query(query)
    return StoreQuery(dense=dense, lexical=query_vector(query), limit=4, candidates=8, since=since)


async def test_the_store_fuses_dense_and_lexical_as_reciprocal_rank_fusion_does(
    store: Sink, embedder: LocalEmbedder
) -> None:
    store.upsert(COLLECTION, _points(embedder))
    request = await _request(embedder, "ERR_OSSL_EVP_UNSUPPORTED")
    dense, lexical = store.rankings(COLLECTION, request)
    # The exact word the model has no sense of is found by BM25 alone: one document holds it.
    assert [hit.payload["chunk_index"] for hit in lexical] == [0]
    fused = store.query(COLLECTION, request)
    assert fused[0].payload["chunk_index"] == 0
    # The store's own fusion (prefetch + RRF) is the fusion search does over several collections.
    expected = fuse([dense, lexical], request.limit)
    assert [(h.id, round(h.score, 6)) for h in fused] == [(h.id, round(h.score, 6)) for h in expected]


async def test_since_is_filtered_by_the_store_in_both_rankings(store: Sink, embedder: LocalEmbedder) -> None:
    store.upsert(COLLECTION, _points(embedder))
    request = await _request(embedder, "session caching approach", since=datetime(2025, 2, 1, tzinfo=UTC))
    for ranking in [*store.rankings(COLLECTION, request), store.query(COLLECTION, request)]:
        assert ranking and {hit.payload["timestamp"] for hit in ranking} == {"2025-02-15T10:00:00Z"}


def _dense_only_shard(tmp_path: Path, points: list[Point]) -> Path:
    """A shard as the importer made them before the lexical vector existed, holding ``points``."""
    folder = tmp_path / "edge" / COLLECTION
    folder.parent.mkdir(exist_ok=True)
    dense_only = edge.EdgeConfig(
        vectors=edge.EdgeVectorParams(size=384, distance=edge.Distance.Cosine, on_disk=True), on_disk_payload=True
    )
    shard = edge.EdgeShard.create(str(folder), dense_only)
    shard.update(edge.UpdateOperation.upsert_points(to_edge_points(points, lexical=False)))
    shard.close()
    assert not has_lexical(folder)
    return folder


async def test_a_collection_made_before_the_lexical_vector_is_searched_by_meaning_only(
    tmp_path: Path, embedder: LocalEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    points = _points(embedder)
    _dense_only_shard(tmp_path, points)
    server_client = QdrantClient(path=str(tmp_path / "server"))
    dense_params = models.VectorParams(size=384, distance=models.Distance.COSINE)
    server_client.create_collection(COLLECTION, vectors_config=dense_params)
    server = ServerSink(server_client, suffix="local", attempts=1)
    # A search opens the embedded store read-only: it changes nothing there and searches by meaning.
    searcher = EdgeStore.open(tmp_path / "edge", suffix="local", for_writing=False)
    for sink in (server, searcher):
        try:
            with caplog.at_level(logging.WARNING):
                if sink is server:
                    sink.upsert(COLLECTION, points)  # new points into an old collection: dense only, no error
                request = await _request(embedder, "ERR_OSSL_EVP_UNSUPPORTED")
                assert len(sink.rankings(COLLECTION, request)) == 1
                found = sink.query(COLLECTION, request)
            assert len(found) == request.limit and found[0].score <= 1.0  # cosine scores: the dense ranking
            assert "searched by meaning only" in caplog.text
            caplog.clear()
        finally:
            sink.close()
    assert not has_lexical(tmp_path / "edge" / COLLECTION)


async def test_the_first_import_adds_the_lexical_vector_to_an_old_shard_keeping_every_point(
    tmp_path: Path, embedder: LocalEmbedder
) -> None:
    points = _points(embedder)
    folder = _dense_only_shard(tmp_path, points)
    store = _edge(tmp_path)  # opened for writing, as an import run opens it
    try:
        assert has_lexical(folder) and not (tmp_path / "edge" / LEXICAL_STAGING).exists()
        kept = {p.id: p for page in all_points(store, COLLECTION) for p in page}
        assert set(kept) == {p.id for p in points}
        for point in points:  # nothing embedded again: the same vectors and payloads
            assert kept[point.id].payload == point.payload
            assert kept[point.id].vector == pytest.approx(point.vector, abs=1e-6)
        request = await _request(embedder, "ERR_OSSL_EVP_UNSUPPORTED")
        assert [hit.payload["chunk_index"] for hit in store.rankings(COLLECTION, request)[1]] == [0]
    finally:
        store.close()


async def test_a_lexical_rebuild_cut_short_by_a_crash_is_finished_by_the_next_open(
    tmp_path: Path, embedder: LocalEmbedder
) -> None:
    points = _points(embedder)
    folder = _dense_only_shard(tmp_path, points)
    staging = tmp_path / "edge" / LEXICAL_STAGING
    staging.mkdir()
    # Crashed after copying and moving the old shard aside, before moving the copy in.
    assert legacy._copy_shard(folder, staging / COLLECTION) == len(points)
    (staging / f"{COLLECTION}.copied").write_text(str(len(points)))
    folder.rename(staging / f"{COLLECTION}.old")
    _edge(tmp_path).close()
    assert has_lexical(folder) and not staging.exists()
    # Crashed half-way through a copy: the copy is made again from the old shard, still in place.
    other = collection_name("other", "local")
    (tmp_path / "edge" / COLLECTION).rename(tmp_path / "edge" / other)
    _dense_only_shard(tmp_path, points)
    staging.mkdir()
    (staging / COLLECTION).mkdir()
    (staging / COLLECTION / "debris").write_text("half a shard")
    store = _edge(tmp_path)
    try:
        assert has_lexical(folder) and not staging.exists()
        assert store.count(COLLECTION) == store.count(other) == len(points)
    finally:
        store.close()


async def test_an_export_to_a_server_carries_the_lexical_vector(tmp_path: Path, embedder: LocalEmbedder) -> None:
    source = _edge(tmp_path)
    target = _stand_in_server(tmp_path)
    try:
        source.upsert(COLLECTION, _points(embedder))
        export(source, target, tmp_path / "progress.json")
        request = await _request(embedder, "ERR_OSSL_EVP_UNSUPPORTED")
        assert [hit.payload["chunk_index"] for hit in target.rankings(COLLECTION, request)[1]] == [0]
    finally:
        source.close()
        target.close()
