"""A whole import as the tests run it: settings for a temporary store and state file, the run, its saved state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from importer.pipeline import RunStats
from importer.runner import run_import
from importer.settings import Settings
from importer.state.base import FileState


def run_settings(source: Path, tmp: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "source": source,
        "qdrant_path": tmp / "qdrant",
        "state_file": tmp / "state.json",
        "checkpoint_seconds": 0.5,
    }
    values.update(extra)
    return Settings(**values)


async def run(settings: Settings) -> RunStats:
    settings.validate()
    return await run_import(settings)


def saved_state(settings: Settings) -> dict[str, FileState]:
    assert settings.state_file is not None
    files = json.loads(settings.state_file.read_text())["files"]
    return {k: FileState.from_json(v) for k, v in files.items()}
