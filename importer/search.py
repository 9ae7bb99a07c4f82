"""``python -m importer search``: one query over every collection of a provider, loading only what it needs.

A person waits for this, so it imports neither the import pipeline nor qdrant-client (for an embedded
store) nor fastembed: the tokenizer and one onnxruntime session embed the query, Edge opens the shards.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from importer.settings import Settings
from importer.store import Sink, open_sink


@dataclass
class Hit:
    score: float
    project: str
    timestamp: str
    source: str
    chunk_index: int
    excerpt: str


async def search(settings: Settings, query: str, *, limit: int = 5, project: str | None = None) -> list[Hit]:
    """Top hits over every collection of this provider (or one project's)."""
    # The store first: a missing or busy store fails before the model is loaded.
    sink = open_sink(
        url=settings.qdrant_url,
        path=settings.qdrant_path,
        api_key=settings.qdrant_api_key,
        suffix=provider_suffix(settings),
        attempts=settings.upsert_attempts,
        for_writing=False,
    )
    try:
        vector = await _embed_query(settings, query)
        return await asyncio.to_thread(_search_collections, sink, vector, limit, project)
    finally:
        sink.close()


def provider_suffix(settings: Settings) -> str:
    """The provider's collection name suffix (``local`` or ``voyage``), without loading a model."""
    if settings.provider == "voyage":
        from importer.embed.voyage import VoyageEmbedder

        return VoyageEmbedder.name
    from importer.embed.query import QueryEmbedder

    return QueryEmbedder.name


async def _embed_query(settings: Settings, query: str) -> list[float]:
    if settings.provider == "voyage":
        from importer.runner import make_embedder

        embedder = make_embedder(settings)
        try:
            return await embedder.embed_query(query)
        finally:
            await embedder.aclose()
    from importer.embed.query import QueryEmbedder
    from importer.model import check_model_dir, default_model_dir

    model_dir = settings.model_dir or default_model_dir()
    check_model_dir(model_dir)
    return await asyncio.to_thread(QueryEmbedder(model_dir).embed_query, query)


def _search_collections(sink: Sink, vector: list[float], limit: int, project: str | None) -> list[Hit]:
    names = sink.collections()
    if project is not None:
        names = [name for name in names if name == sink.collection_for(project)]
    hits: list[Hit] = []
    for name in names:
        for found in sink.query(name, vector, limit):
            payload = found.payload
            text = " ".join(str(payload.get("text", "")).split())
            hits.append(
                Hit(
                    score=found.score,
                    project=str(payload.get("project", "")),
                    timestamp=str(payload.get("timestamp", "")),
                    source=str(payload.get("source", "")),
                    chunk_index=int(payload.get("chunk_index", 0)),
                    excerpt=text[:200] + ("…" if len(text) > 200 else ""),
                )
            )
    return sorted(hits, key=lambda h: h.score, reverse=True)[:limit]
