"""One query vector from the prepared all-MiniLM-L6-v2, with nothing but the tokenizer and onnxruntime.

``python -m importer search`` embeds a single short text: loading fastembed (and through it half of the
Hugging Face stack) would cost more than the search itself. This computes what fastembed computes for this
model (truncation to the model's length, mean pooling over the attention mask, L2 normalisation);
tests/importer/embed/test_query.py checks the vectors agree with :class:`importer.embed.local.LocalEmbedder`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
from tokenizers import Tokenizer


class QueryEmbedder:
    name = "local"
    dimensions = 384

    def __init__(self, model_dir: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=_max_length(model_dir))
        self._tokenizer.no_padding()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # one short text: more threads cost more to start than they save
        self._session = onnxruntime.InferenceSession(
            str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def embed_query(self, text: str) -> list[float]:
        encoding = self._tokenizer.encode(text)
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.array([encoding.attention_mask], dtype=np.int64)
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (hidden,) = self._session.run(["last_hidden_state"], inputs)
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        vector = pooled[0] / max(float(np.linalg.norm(pooled[0])), 1e-12)
        return [float(x) for x in vector.astype(np.float32)]


def _max_length(model_dir: Path) -> int:
    """What fastembed truncates to: the stricter of the tokenizer's model_max_length and max_length."""
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    limits = [int(config[key]) for key in ("model_max_length", "max_length") if int(config.get(key) or 0) > 0]
    return min(limits) if limits else 512
