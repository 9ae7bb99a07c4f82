"""The lexical vector stored beside the dense one: BM25 term weights, for words the model does not know.

A dense model misses exact words it has no sense of (a command's flag, an error code, a file name); BM25 finds
them. The weights come from Qdrant Edge's own BM25 (Rust, in qdrant-edge-py, which is installed anyway): an
English word tokenizer, lower case, English stop words and Snowball stemming, hashed token ids; no model to
download, ~0.06 ms per chunk. A document's weights are BM25's term-frequency part; the store multiplies in
each term's inverse document frequency (the sparse vector's IDF modifier), which it keeps up to date as
points arrive. A query's weights are 1 per distinct term.

Both stores use the same weights, so a store exported to a server needs nothing recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

#: The sparse vector's name in every collection (the dense vector is the unnamed default).
SPARSE_VECTOR = "bm25"


@dataclass(frozen=True, slots=True)
class Sparse:
    indices: list[int]
    values: list[float]


@cache
def _bm25() -> Any:
    import qdrant_edge as edge

    return edge.Bm25()


def document_vector(text: str) -> Sparse:
    found = _bm25().embed_document(text)
    return Sparse(list(found.indices), list(found.values))


def query_vector(text: str) -> Sparse:
    found = _bm25().embed_query(text)
    return Sparse(list(found.indices), list(found.values))
