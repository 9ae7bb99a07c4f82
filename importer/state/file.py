"""State in a local JSON file, for laptop runs. Also reads the older importer's state files.

The file is replaced atomically (temp file, fsync, rename), so a crash leaves either the old or the
new state, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from importer.contract import ShardSummary
from importer.state.base import LEGACY, FileState

FORMAT = "reflection-importer/state/v1"
#: Status of an entry taken over from the older importer: its file counts as imported while its
#: mtime is not newer than what that importer recorded.


class FileStateStore:
    def __init__(self, path: Path, *, source_root: Path | None = None) -> None:
        self.path = path
        self.source_root = source_root
        self._files: dict[str, FileState] = {}

    def load(self) -> dict[str, FileState]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("format") == FORMAT:
            self._files = {k: FileState.from_json(v) for k, v in data["files"].items()}
        else:
            self._files = read_legacy(data, self.source_root)
            shutil.copy2(self.path, self.path.with_name(self.path.name + ".legacy-backup"))
        return dict(self._files)

    def save(self, files: dict[str, FileState], summary: ShardSummary) -> None:
        self._files.update(files)
        document = {
            "format": FORMAT,
            "summary": summary.to_json(),
            "files": {k: v.to_json() for k, v in sorted(self._files.items())},
        }
        write_atomically(self.path, json.dumps(document, separators=(",", ":")).encode())


def write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_legacy(data: Any, source_root: Path | None) -> dict[str, FileState]:
    """Entries of the older importer's state: path → timestamp string, or an object with
    ``last_modified``/``last_imported``/``chunks_imported`` or ``imported_at``/``last_modified``/``chunks``.
    """
    if not isinstance(data, dict):
        raise ValueError("state file is neither this importer's format nor the older importer's")
    files = data.get("imported_files", data)
    entries: dict[str, FileState] = {}
    for path, value in files.items():
        recorded = _legacy_time(value)
        if recorded is None:
            continue
        chunks = value.get("chunks_imported", value.get("chunks", 0)) if isinstance(value, dict) else 0
        entries[legacy_key(path, source_root)] = FileState(
            mtime=recorded, chunks=int(chunks or 0), next_chunk=int(chunks or 0), status=LEGACY
        )
    return entries


def _legacy_time(value: Any) -> float | None:
    """The time the older importer last saw the file: its recorded mtime, else when it imported it."""
    if isinstance(value, dict):
        value = value.get("last_modified") or value.get("imported_at") or value.get("last_imported")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def legacy_key(path: str, source_root: Path | None) -> str:
    """Map the older importer's (usually absolute) path onto this importer's key: the path relative
    to the source root. Paths from another mount point keep their project folder and file name."""
    if source_root is not None:
        try:
            return Path(path).relative_to(source_root).as_posix()
        except ValueError:
            pass
    parts = PurePosixPath(path).parts
    keep = 4 if len(parts) >= 4 and parts[-2] == "subagents" else 2
    return PurePosixPath(*parts[-keep:]).as_posix()
