"""QueryEmbedder (tokenizer + onnxruntime only) gives the vectors fastembed gives, so search finds what it did."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from importer.embed.local import LocalEmbedder
from importer.embed.query import QueryEmbedder

QUERIES = [
    "how did we fix the flaky retry test",
    "ünïcödé and emoji 🚀 survive",
    "x",
    # longer than the 256 tokens the model reads: both must truncate the same way
    "the importer streams conversation logs into qdrant and remembers what it did " * 40,
]


async def test_query_vectors_match_fastembed(model_dir: Path) -> None:
    light = QueryEmbedder(model_dir)
    reference = LocalEmbedder(model_dir)
    try:
        for query in QUERIES:
            expected = np.asarray(await reference.embed_query(query))
            got = np.asarray(light.embed_query(query))
            assert got.shape == (384,)
            assert abs(float(np.linalg.norm(got)) - 1) < 1e-5
            assert float(np.max(np.abs(got - expected))) < 1e-4, query[:40]
    finally:
        await reference.aclose()
