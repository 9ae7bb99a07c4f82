"""The local embedding provider: all-MiniLM-L6-v2 run by onnxruntime directly, no network at all.

The prepared folder (:func:`importer.model.prepare_model`) is fastembed-ready, and fastembed is
what we measure against (bench/importer_bench.py), but the importer runs the graph itself: each
text is tokenized once, texts are sorted by their token count and cut into batches by a budget of
padded tokens rather than by a count, so that no batch pads short texts to a long one's length.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from importer.contract import DEFAULT_BATCH_SIZE
from importer.model import MAX_TOKENS, check_model_dir, default_model_dir

#: Characters per chunk that the model reads in full.  all-MiniLM-L6-v2 reads 256 tokens (254 of
#: text plus [CLS] and [SEP]) and silently drops the rest.  Measured on make_corpus.py's realistic
#: profile with this tokenizer (tests/importer/embed/test_local.py keeps it true): 1000-character
#: windows of prose and code fit in 256 tokens 99.8 % of the time, 1100-character ones 98.7 %.
LOCAL_MAX_CHARS = 1000

# DEFAULT_BATCH_SIZE (importer.contract, so that the operator's default is the same one): why 2.
# Texts of the full 256 tokens per onnxruntime call; the batches are cut by the budget of padded tokens
# (texts × longest text) this makes, so shorter texts go more at a time: with 2, a budget of 512 tokens,
# while 60-token texts go 8 at a time.
# Measured on 100 chunks of make_corpus.py's realistic profile, texts sorted by token count, 2 loaded
# cores: budgets of 2048 and 4096 tokens took 15-16 s, 8192 and fixed counts of 8 or 32 texts 23-24 s,
# one text at a time (no padding at all) 27 s: small batches keep activations in cache, and sorting
# leaves little padding to save.  Memory decides between the small ones: onnxruntime's arena keeps the
# largest activations it has served (attention alone is texts × 12 heads × length² floats), two batches at
# a time.  Embedding 1,031 realistic chunks in a fresh process (2 workers, 3 alternating rounds, RSS 179 MB
# after loading), budgets of 1 / 2 / 3 / 4 × 256 tokens peaked at 226 / 247-248 / 266-275 / 297-301 MB and
# took 53.6-55.5 / 51.0-54.1 / 52.2-58.7 / 51.9-56.1 CPU-seconds: the same work.  2 leaves the importer
# room under its 350 MB target at the cost of no measurable speed; 1 would save 21 MB more.

_PAD_ID = 0  # [PAD] in this vocabulary


class LocalEmbedder:
    """Embeds with the prepared all-MiniLM-L6-v2 folder (see :func:`importer.model.prepare_model`).

    onnxruntime's calls are synchronous and CPU-bound, so they run in a thread pool: onnxruntime
    releases the GIL, and the event loop keeps reading files and talking to Qdrant meanwhile.
    """

    name = "local"
    dimensions = 384
    max_chars = LOCAL_MAX_CHARS

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int = 2,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        model_dir = model_dir or default_model_dir()
        check_model_dir(model_dir)
        # Nothing here downloads, but fastembed is installed and qdrant-client may load it; its hub
        # library honours this switch, so nothing can spend ~40 s retrying an unreachable Hugging Face.
        os.environ["HF_HUB_OFFLINE"] = "1"
        self.batch_size = batch_size
        #: Padded tokens per onnxruntime call (see :data:`DEFAULT_BATCH_SIZE`).
        self.token_budget = max(batch_size, 1) * MAX_TOKENS
        self._session: ort.InferenceSession | None = _session(model_dir / "model.onnx")
        # ``threads`` batches run at once, each on one core, rather than one batch spread over
        # ``threads`` cores: an operator split over two threads waits for the slower at every one of
        # the graph's ~60 steps, and on a busy machine one of them is often descheduled.  Measured on
        # 100 chunks, 2 loaded cores, alternating: 23-32 s against 40-43 s for intra-op threads.
        self._batch_workers = ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="embed-batch")
        #: Texts per ``embed`` call: a full batch for each parallel worker, or one of them idles.
        self.call_size = max(batch_size, 1) * max(threads, 1)
        # Tokenizing and whole blocking calls (queries) run in this one: embedding never blocks the loop.
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-local")
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.no_padding()
        self._model_dir = model_dir

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed document chunks, in order; longer than 256 tokens means truncated by the model.

        No thread blocks on a whole call: each batch goes to the batch workers' queue as a task of its
        own, so calls made before the last one ends queue their batches behind its batches, and a worker
        that finishes early takes the next batch instead of idling until its sibling ends (profiled with
        py-spy: with one blocking call at a time the two workers idled 19 % and 30 % of the run). Cancelling
        the call drops its batches that have not started.
        """
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        # The first call loads the model (seconds): not on the event loop.
        session = await loop.run_in_executor(self._executor, self._require_session)
        encodings = await loop.run_in_executor(self._executor, self._tokenizer.encode_batch, list(texts))
        batches = list(_token_budget_batches([len(e.ids) for e in encodings], self.token_budget))
        embedded = await asyncio.gather(
            *(loop.run_in_executor(self._batch_workers, _run, session, [encodings[i] for i in b]) for b in batches)
        )
        return _in_order(len(encodings), batches, embedded)

    async def embed_query(self, text: str) -> list[float]:
        """Embed a search query (this model embeds queries and documents alike)."""
        loop = asyncio.get_running_loop()
        (vector,) = await loop.run_in_executor(self._executor, self.embed_now, [text])
        return vector

    async def aclose(self) -> None:
        """Drop the model; shut the thread pool down if this embedder created it."""
        self._session = None
        await asyncio.to_thread(self._batch_workers.shutdown, wait=True)
        if self._owns_executor:
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    def count_tokens(self, text: str) -> int:
        """Tokens the model would see for ``text`` before truncation, [CLS] and [SEP] included."""
        return len(self._counter.encode(text).ids)

    @functools.cached_property
    def _counter(self) -> Tokenizer:
        """An untruncated tokenizer, loaded on first use: only measuring needs it, not embedding or search."""
        counter = Tokenizer.from_file(str(self._model_dir / "tokenizer.json"))
        counter.no_truncation()
        counter.no_padding()
        return counter

    def embed_now(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed ``texts``, blocking the calling thread (for a caller with no event loop, e.g. one query).

        Each text is tokenized once; the order of the texts does not change their vectors.
        """
        session = self._require_session()
        encodings = self._tokenizer.encode_batch(list(texts))
        batches = list(_token_budget_batches([len(e.ids) for e in encodings], self.token_budget))
        embedded = self._batch_workers.map(lambda batch: _run(session, [encodings[i] for i in batch]), batches)
        return _in_order(len(encodings), batches, embedded)

    def _require_session(self) -> ort.InferenceSession:
        if self._session is None:
            raise RuntimeError("LocalEmbedder is closed")
        return self._session


def _session(model_file: Path, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """One session for every batch worker (``run`` is thread-safe), each call on its caller's thread alone."""
    options = options or session_options()
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def session_options() -> ort.SessionOptions:
    """The importer's onnxruntime settings (bench/session_settings_bench.py measures others against them)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1  # the graph is one chain of operators: nothing runs beside another
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The memory arena stays on (the default): without it embedding ran 1-5 % faster, but the process's anonymous
    # memory rose and fell by tens of MB instead of staying flat (README: "How close to the machine's limit").
    return options


def _token_budget_batches(lengths: list[int], budget: int) -> Iterator[list[int]]:
    """Indexes of the texts, shortest first, in batches whose padded size (count × longest) fits ``budget``.

    A text longer than the budget still gets a batch of its own.
    """
    batch: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Sorted ascending: the text being added is the batch's longest.
        if batch and (len(batch) + 1) * lengths[index] > budget:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def _in_order(count: int, batches: list[list[int]], embedded: Iterable[np.ndarray]) -> list[list[float]]:
    """The batches' vectors as lists, back in the texts' order (``batches`` holds each batch's text indexes)."""
    vectors = np.empty((count, LocalEmbedder.dimensions), dtype=np.float32)
    for batch, batch_vectors in zip(batches, embedded, strict=True):
        vectors[batch] = batch_vectors
    return vectors.tolist()


def _run(session: ort.InferenceSession, encodings: list[Encoding]) -> np.ndarray:
    """Mean-pooled, unit-length vectors of one batch, padded on the right to its longest text.

    The fused graph's attention reads each text's length from the mask, so padding must be on the right.
    """
    longest = max(len(e.ids) for e in encodings)
    ids = np.full((len(encodings), longest), _PAD_ID, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    (hidden,) = session.run(["last_hidden_state"], feeds)
    weights = mask[:, :, None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    norms: np.ndarray = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.maximum(norms, 1e-12)
