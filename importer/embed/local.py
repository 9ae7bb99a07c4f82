"""The local embedding provider: all-MiniLM-L6-v2 through fastembed (onnxruntime), no network at all."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from importer.model import DEFAULT_MODEL, check_model_dir, default_model_dir

if TYPE_CHECKING:
    from fastembed import TextEmbedding

#: Characters per chunk that the model reads in full.  all-MiniLM-L6-v2 reads 256 tokens (254 of
#: text plus [CLS] and [SEP]) and silently drops the rest.  Measured on make_corpus.py's realistic
#: profile with this tokenizer (tests/importer/embed/test_local.py keeps it true): 1000-character
#: windows of prose and code fit in 256 tokens 99.8 % of the time, 1100-character ones 98.7 %.
LOCAL_MAX_CHARS = 1000


class LocalEmbedder:
    """Embeds with the prepared all-MiniLM-L6-v2 folder (see :func:`importer.model.prepare_model`).

    fastembed's calls are synchronous and CPU-bound, so they run in a thread pool: onnxruntime
    releases the GIL, and the event loop keeps reading files and talking to Qdrant meanwhile.
    """

    name = "local"
    dimensions = 384
    max_chars = LOCAL_MAX_CHARS

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        batch_size: int = 32,
        threads: int = 2,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        model_dir = model_dir or default_model_dir()
        check_model_dir(model_dir)
        # fastembed never downloads when given a folder, but the hub library also honours this
        # switch, so nothing in the process can spend ~40 s retrying an unreachable Hugging Face.
        os.environ["HF_HUB_OFFLINE"] = "1"
        from fastembed import TextEmbedding  # imported late: it pulls in onnxruntime

        self.batch_size = batch_size
        self._model: TextEmbedding | None = TextEmbedding(
            DEFAULT_MODEL,
            cache_dir=str(model_dir),
            threads=threads,
            specific_model_path=str(model_dir),
            local_files_only=True,
            cuda=False,
        )
        # One worker is enough: onnxruntime already spreads each batch over ``threads`` cores, and
        # two batches at once would only compete for them and double the activation memory.
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-local")
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed document chunks, in order; longer than 256 tokens means truncated by the model."""
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._embed_documents, list(texts))

    async def embed_query(self, text: str) -> list[float]:
        """Embed a search query (this model embeds queries and documents alike)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._embed_query, text)

    async def aclose(self) -> None:
        """Drop the model; shut the thread pool down if this embedder created it."""
        self._model = None
        if self._owns_executor:
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    def count_tokens(self, text: str) -> int:
        """Tokens the model would see for ``text`` before truncation, [CLS] and [SEP] included."""
        return len(self._tokenizer.encode(text).ids)

    def _embed_documents(self, texts: list[str]) -> list[list[float]]:
        # fastembed's default batch of 256 pads every text to the longest one and costs gigabytes
        # of activations on long chunks; a small batch is as fast and keeps memory bounded.
        vectors = self._require_model().embed(texts, batch_size=self.batch_size)
        return [np.asarray(vector, dtype=np.float32).tolist() for vector in vectors]

    def _embed_query(self, text: str) -> list[float]:
        (vector,) = self._require_model().query_embed([text])
        return np.asarray(vector, dtype=np.float32).tolist()

    def _require_model(self) -> TextEmbedding:
        if self._model is None:
            raise RuntimeError("LocalEmbedder is closed")
        return self._model
