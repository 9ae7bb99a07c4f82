"""Fixtures for the importer's tests: generated conversation trees and runs of the real importer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


@dataclass(frozen=True)
class SearchableStore:
    """A conversation tree with known contents and the embedded store the real importer wrote from it."""

    source: Path
    qdrant: Path

    def args(self) -> list[str]:
        return ["--qdrant-path", str(self.qdrant), "--source", str(self.source)]


BAKERY = [
    ("user", "Why is my bread dough not rising? It sat for three hours and stayed flat."),
    ("assistant", "The yeast was most likely killed: water hotter than 60 °C kills it. Use lukewarm water."),
    ("user", "I used water straight from the kettle, that explains it."),
    ("assistant", "Yes. Let the water cool to about 35 °C, then add the yeast and a pinch of sugar."),
    ("user", "Should I knead it longer next time?"),
    ("assistant", "Knead about ten minutes, until the dough passes the windowpane test."),
    ("user", "Thanks, the second loaf rose beautifully."),
]
BAKERY_AGENT = [
    ("user", "Find the oven temperature for a rye loaf."),
    ("assistant", "Bake rye bread at 230 °C for the first ten minutes, then 200 °C."),
]
INFRA = [
    ("user", "The payment pod is in CrashLoopBackOff after the deploy."),
    ("assistant", "Its liveness probe hits /health before the app listens; raise initialDelaySeconds to 30."),
]


def write_session(path: Path, cwd: str, turns: list[tuple[str, str]], start: datetime) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        {
            "type": role,
            "message": {"role": role, "content": text},
            "timestamp": (start + timedelta(minutes=i)).isoformat().replace("+00:00", "Z"),
            "cwd": cwd,
            "gitBranch": "main",
        }
        for i, (role, text) in enumerate(turns)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture(scope="session")
def searchable_store(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SearchableStore:
    """Two projects: an old bakery session (with a sub-agent) and an infra session from yesterday."""
    work = tmp_path_factory.mktemp("searchable")
    source = work / "projects"
    old = datetime(2025, 1, 10, 9, 0, tzinfo=UTC)
    write_session(source / "-home-ann-bakery" / "s1.jsonl", "/home/ann/bakery", BAKERY, old)
    write_session(
        source / "-home-ann-bakery" / "s1" / "subagents" / "agent-a1.jsonl", "/home/ann/bakery", BAKERY_AGENT, old
    )
    yesterday = datetime.now(UTC) - timedelta(days=1)
    write_session(source / "-home-bob-infra" / "s2.jsonl", "/home/bob/infra", INFRA, yesterday)
    store = SearchableStore(source=source, qdrant=work / "qdrant")
    command = [sys.executable, "-m", "importer", "run", "--source", str(source), "--qdrant-path", str(store.qdrant)]
    command += ["--state-file", str(work / "state.json"), "--settle-seconds", "0"]
    subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    return store
