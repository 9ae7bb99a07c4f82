"""LocalEmbedder with the real all-MiniLM-L6-v2, prepared from the PyPI package, offline."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from importer.bert_onnx import build_bert_onnx
from importer.embed.base import Embedder
from importer.embed.local import DEFAULT_BATCH_SIZE, LOCAL_MAX_CHARS, LocalEmbedder, _token_budget_batches
from importer.model import (
    DEFAULT_MODEL,
    MAX_TOKENS,
    ModelNotPrepared,
    prepare_model,
    read_safetensors,
    source_weights_dir,
)
from importer.settings import Settings

CORPUS_SCRIPT = Path(os.environ.get("CORPUS_SCRIPT", "/work/shared/corpus/make_corpus.py"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The same folder the model tests prepare: whichever module runs second reuses it.
    return prepare_model(tmp_path_factory.getbasetemp() / "prepared-model")


@pytest.fixture(scope="module")
def embedder(model_dir: Path) -> Iterator[LocalEmbedder]:
    # Constructed outside any event loop: the thread pool is not tied to one, so each test's loop can use it.
    local = LocalEmbedder(model_dir)
    yield local
    asyncio.run(local.aclose())


def cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_implements_the_embedder_protocol(embedder: LocalEmbedder) -> None:
    as_protocol: Embedder = embedder  # checked by mypy
    assert (as_protocol.name, as_protocol.dimensions, as_protocol.batch_size) == ("local", 384, DEFAULT_BATCH_SIZE)
    assert embedder.token_budget == DEFAULT_BATCH_SIZE * MAX_TOKENS
    assert Settings().batch_size == DEFAULT_BATCH_SIZE  # the command line's default is the embedder's
    assert as_protocol.max_chars == LOCAL_MAX_CHARS


async def test_vectors_are_384_dimensional_unit_lists(embedder: LocalEmbedder) -> None:
    texts = ["first chunk", "second chunk about qdrant", "ünïcödé and emoji 🚀 survive", ""]
    vectors = await embedder.embed(texts)
    assert len(vectors) == len(texts)
    for vector in vectors:
        assert isinstance(vector, list) and isinstance(vector[0], float)
        assert len(vector) == 384
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert await embedder.embed([]) == []


async def test_related_texts_score_higher_than_unrelated(embedder: LocalEmbedder) -> None:
    oom, memory, cake = await embedder.embed(
        [
            "the kubernetes pod was OOM killed",
            "container exceeded its memory limit",
            "I baked a chocolate cake",
        ]
    )
    assert cosine(oom, memory) > cosine(oom, cake) + 0.15
    assert cosine(oom, memory) > cosine(memory, cake) + 0.1


async def test_order_and_batching_do_not_change_vectors(embedder: LocalEmbedder) -> None:
    texts = [f"message {n}: " + "the importer keeps qdrant filled " * (n % 7 + 1) for n in range(70)]
    together = await embedder.embed(texts)  # batches of up to 2048 padded tokens, sorted by length
    one = await embedder.embed([texts[45]])
    assert cosine(together[45], one[0]) > 0.99999


async def test_query_embedding_matches_document_embedding(embedder: LocalEmbedder) -> None:
    # all-MiniLM-L6-v2 is symmetric: no query prefix, so a query equals the same text as a document.
    query = await embedder.embed_query("how do I restart the importer job")
    (document,) = await embedder.embed(["how do I restart the importer job"])
    assert len(query) == 384
    assert cosine(query, document) > 0.99999


async def test_embedding_does_not_block_the_event_loop(embedder: LocalEmbedder) -> None:
    """Other coroutines run while a batch is embedded: counted by what they see, not by how long they wait,
    so a loaded machine cannot make it fail. Embedding on the event loop itself would leave no tick in between."""
    chunks = [f"log line {n}: the container exceeded its memory limit. " * 18 for n in range(48)]
    embedding = asyncio.create_task(embedder.embed(chunks))
    ticks_while_embedding = 0
    while not embedding.done():
        ticks_while_embedding += 1
        await asyncio.sleep(0.001)  # a turn of the loop: possible only while embedding leaves it free
    assert len(await embedding) == len(chunks)
    assert ticks_while_embedding >= 5, ticks_while_embedding


async def test_model_reads_only_the_first_256_tokens(embedder: LocalEmbedder) -> None:
    words = [f"word{n} alpha beta gamma delta kubernetes" for n in range(120)]
    long_text = " ".join(words)
    assert embedder.count_tokens(long_text) > 2 * MAX_TOKENS
    # [CLS] + 254 text tokens + [SEP] = 256: cut the text right after its 254th token.
    encoding = embedder._tokenizer.encode(long_text)
    prefix = long_text[: encoding.offsets[MAX_TOKENS - 2][1]]
    assert embedder.count_tokens(prefix) == MAX_TOKENS
    shorter = long_text[: encoding.offsets[MAX_TOKENS - 60][1]]
    long_vector, prefix_vector, shorter_vector = await embedder.embed([long_text, prefix, shorter])
    assert cosine(long_vector, prefix_vector) > 0.99999
    # The check can fail: dropping the last 58 tokens the model reads does change the vector.
    assert cosine(long_vector, shorter_vector) < 0.999


def test_count_tokens_counts_special_tokens_and_does_not_truncate(embedder: LocalEmbedder) -> None:
    assert embedder.count_tokens("hello world") == 4  # [CLS] hello world [SEP]
    assert embedder.count_tokens("hello " * 1000) == 1002


def corpus_texts(root: Path) -> list[str]:
    """The texts a chunker embeds: user and assistant text, thinking, and tool output (code, logs)."""
    texts: list[str] = []
    for path in root.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            message = json.loads(line).get("message")
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                texts.append(content)
            for block in content if isinstance(content, list) else []:
                texts.append(block.get("text") or block.get("thinking") or "")
                result = block.get("content")
                if isinstance(result, str):
                    texts.append(result)
                elif isinstance(result, list):
                    texts.extend(part.get("text", "") for part in result)
    return texts


@pytest.mark.skipif(not CORPUS_SCRIPT.exists(), reason="make_corpus.py not found (set CORPUS_SCRIPT)")
def test_max_chars_chunks_fit_the_model_window(embedder: LocalEmbedder, tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(CORPUS_SCRIPT), str(tmp_path), "--files", "25", "--profile", "realistic"],
        check=True,
        capture_output=True,
    )
    size = embedder.max_chars
    windows = [text[i : i + size] for text in corpus_texts(tmp_path) for i in range(0, len(text) - size + 1, size)]
    assert len(windows) > 500
    fitting = sum(embedder.count_tokens(window) <= MAX_TOKENS for window in windows)
    assert fitting / len(windows) >= 0.99


@pytest.fixture(scope="module")
def plain_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model folder as it was before the fused graph: standard ONNX operators, run by fastembed."""
    folder = tmp_path_factory.mktemp("plain-model")
    for file in model_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    source = source_weights_dir()
    config = json.loads((source / "config.json").read_text())
    plain = build_bert_onnx(config, read_safetensors(source / "model.safetensors"), fused=False)
    (folder / "model.onnx").write_bytes(plain.SerializeToString())
    return folder


@pytest.mark.skipif(not CORPUS_SCRIPT.exists(), reason="make_corpus.py not found (set CORPUS_SCRIPT)")
def test_vectors_match_fastembed_on_the_plain_graph(
    embedder: LocalEmbedder, plain_model_dir: Path, tmp_path: Path
) -> None:
    """The fused graph, token-budget batches and our pooling give the vectors fastembed gave before them."""
    from fastembed import TextEmbedding

    subprocess.run(
        [sys.executable, str(CORPUS_SCRIPT), str(tmp_path), "--files", "4", "--profile", "realistic", "--seed", "3"],
        check=True,
        capture_output=True,
    )
    # Chunk-sized windows of real-looking log text, plus the edge cases: empty, one word, unicode, too long.
    windows = [text[:LOCAL_MAX_CHARS] for text in corpus_texts(tmp_path) if text.strip()][:60]
    texts = [*windows, "", "ok", "ünïcödé and emoji 🚀 survive", "kubernetes " * 400]
    reference = TextEmbedding(DEFAULT_MODEL, specific_model_path=str(plain_model_dir), local_files_only=True)
    expected = list(reference.embed(texts, batch_size=32))
    actual = embedder.embed_now(texts)
    worst = min(cosine(a, list(e)) for a, e in zip(actual, expected, strict=True))
    assert worst >= 0.9999


def test_token_budget_batches_sort_by_length_and_respect_the_budget() -> None:
    lengths = [200, 10, 256, 30, 30, 120, 2, 256, 64]
    batches = list(_token_budget_batches(lengths, budget=512))
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths)
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 512
    # A text longer than the budget still gets embedded, alone.
    assert list(_token_budget_batches([300, 5], budget=256)) == [[1], [0]]


def test_loading_and_embedding_never_touch_the_network(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    local = LocalEmbedder(model_dir, threads=1)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    (vector,) = asyncio.run(local.embed(["offline"]))
    assert len(vector) == 384
    asyncio.run(local.aclose())


def test_missing_model_folder_fails_fast_with_the_prepare_command(tmp_path: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(ModelNotPrepared, match="python -m importer model prepare"):
        LocalEmbedder(tmp_path / "not-prepared")
    assert time.perf_counter() - started < 1


async def test_aclose_shuts_down_only_an_owned_executor(model_dir: Path) -> None:
    shared = ThreadPoolExecutor(max_workers=1)
    borrowing = LocalEmbedder(model_dir, executor=shared, batch_size=4)
    assert (borrowing.batch_size, borrowing.token_budget) == (4, 4 * MAX_TOKENS)
    await borrowing.embed(["uses the shared pool"])
    await borrowing.aclose()
    assert shared.submit(lambda: 42).result() == 42  # the caller's pool still works
    shared.shutdown()

    owning = LocalEmbedder(model_dir)
    await owning.aclose()
    with pytest.raises(RuntimeError):
        await owning.embed(["after close"])
