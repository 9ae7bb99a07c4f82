"""Fixtures for the importer's tests: generated conversation trees and runs of the real importer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from importer.model import prepare_model

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("REFLECTION_SHARED", REPO.parent / "shared"))
MAKE_CORPUS = SHARED / "corpus" / "make_corpus.py"
REAL_SESSIONS = SHARED / "corpus" / "real"


@pytest.fixture(scope="session")
def real_sessions() -> Path:
    """A few real Claude Code session files (../shared/corpus/real)."""
    return REAL_SESSIONS


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real model, prepared offline the way users prepare it (idempotent: cached after the first)."""
    return prepare_model()


@pytest.fixture(scope="session")
def make_corpus(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, dict[str, Any]]]:
    """Write a tree with ../shared/corpus/make_corpus.py; return it with its manifest."""

    def make(files: int = 20, profile: str = "small", seed: int = 1, faults: bool = False) -> tuple[Path, dict]:
        out = tmp_path_factory.mktemp(f"corpus-{profile}-{files}-{seed}")
        command = [sys.executable, str(MAKE_CORPUS), str(out), "--files", str(files), "--profile", profile]
        command += ["--seed", str(seed)] + (["--faults"] if faults else [])
        subprocess.run(command, check=True, capture_output=True)
        manifest = json.loads((out / "MANIFEST.json").read_text())
        (out / "MANIFEST.json").unlink()  # not a session file; keep the tree as Claude Code writes it
        return out, manifest

    return make
