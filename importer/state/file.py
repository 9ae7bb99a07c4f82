"""State in a local JSON file, for laptop runs. Also reads the older importer's state files.

The file is replaced atomically (temp file, fsync, rename), so a crash leaves either the old or the
new state, never half of one. A state file that cannot be read is moved aside (``<file>.corrupt-<time>``)
and the run starts over; an entry that cannot be understood is dropped and its file imported again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import stat
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from importer.contract import ShardSummary
from importer.state.base import DELETED, LEGACY, BadEntry, FileState, read_entries, read_summary

log = logging.getLogger(__name__)

FORMAT = "reflection-importer/state/v1"


class UnreadableState(ValueError):
    """The state file as a whole is not one this importer (or the older one) wrote."""


class FileStateStore:
    def __init__(self, path: Path, *, source_root: Path | None = None) -> None:
        self.path = path
        self.source_root = source_root
        self._files: dict[str, FileState] = {}
        self._summary: ShardSummary | None = None
        # A checkpoint abandoned by a stopping run may still be saving when the final one starts.
        self._lock = threading.Lock()

    def load(self) -> dict[str, FileState]:
        """What was saved. Checks first that the state can be written at all, so a bad location fails
        the run before anything is embedded rather than at its first checkpoint."""
        check_writable(self.path)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
            if isinstance(data, dict) and data.get("format") == FORMAT:
                self._files = read_current(data)
                self._summary = read_summary(data.get("summary"))
                return dict(self._files)
            self._files = read_legacy(data, self.source_root)
        except (UnreadableState, ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
            self._move_aside(error)
            return {}
        shutil.copy2(self.path, self.path.with_name(self.path.name + ".legacy-backup"))
        return dict(self._files)

    def _move_aside(self, error: Exception) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.replace(self.path, aside)
        log.warning(
            "state file unreadable: moved aside, every file is imported again",
            extra={"state_file": str(self.path), "moved_to": str(aside), "error": str(error)},
        )

    def saved_summary(self) -> ShardSummary | None:
        return self._summary

    def save(self, files: dict[str, FileState], summary: ShardSummary) -> None:
        with self._lock:
            self._files.update(files)
            for pruned in [k for k, v in files.items() if v.status == DELETED]:
                del self._files[pruned]
            document = {
                "format": FORMAT,
                "summary": summary.to_json(),
                "files": {k: v.to_json() for k, v in sorted(self._files.items())},
            }
            write_atomically(self.path, json.dumps(document, separators=(",", ":")).encode())


def check_writable(path: Path) -> None:
    """Raise now if ``path`` cannot be replaced: its parent is not a folder we may write, or the file
    itself is read-only (which a rename would silently override)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise NotADirectoryError(f"state file {path}: a parent is not a directory") from error
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"state file {path}: cannot write in {path.parent}")
    if path.exists() and _read_only(path):
        raise PermissionError(f"state file {path} is read-only: make it writable or give another --state-file")


def _read_only(path: Path) -> bool:
    """No write permission for us, or none for anybody (which root would otherwise ignore)."""
    return not os.access(path, os.W_OK) or not stat.S_IMODE(path.stat().st_mode) & 0o222


def write_atomically(path: Path, content: bytes) -> None:
    """Replace ``path`` with ``content`` (temp file, fsync, rename), keeping the file's mode."""
    check_writable(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            _keep_mode(path, fh.fileno())
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


def _keep_mode(path: Path, fd: int) -> None:
    """The replacement gets the mode of the file it replaces (a new state file stays 0600: it lists
    the user's conversations)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    os.fchmod(fd, mode)


def read_current(data: dict[str, Any]) -> dict[str, FileState]:
    files = data.get("files")
    if not isinstance(files, dict):
        raise UnreadableState("no 'files' object")
    return read_entries(files)


def read_legacy(data: Any, source_root: Path | None) -> dict[str, FileState]:
    """Entries of the older importer's state: path → timestamp string, or an object with
    ``last_modified``/``last_imported``/``chunks_imported`` or ``imported_at``/``last_modified``/``chunks``.
    """
    files = data.get("imported_files", data) if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise UnreadableState("neither this importer's format nor the older importer's")
    entries: dict[str, FileState] = {}
    for path, value in files.items():
        try:
            entries[legacy_key(path, source_root)] = _legacy_entry(value)
        except BadEntry as error:
            log.warning(
                "older state entry dropped: its file is imported again", extra={"source": path, "error": str(error)}
            )
    return entries


def _legacy_entry(value: Any) -> FileState:
    recorded = _legacy_time(value)
    # an unreadable, infinite or future time would mark the file imported however it changes
    if recorded is None or not math.isfinite(recorded) or recorded > time.time():
        raise BadEntry(f"no usable time in {value!r}")
    chunks = value.get("chunks_imported", value.get("chunks", 0)) if isinstance(value, dict) else 0
    if chunks is None:
        chunks = 0
    if type(chunks) is not int or chunks < 0:
        raise BadEntry(f"chunk count {chunks!r}")
    return FileState(mtime=recorded, chunks=chunks, next_chunk=chunks, status=LEGACY)


def _legacy_time(value: Any) -> float | None:
    """The time the older importer last saw the file: its recorded mtime, else when it imported it."""
    if isinstance(value, dict):
        value = value.get("last_modified") or value.get("imported_at") or value.get("last_imported")
    if isinstance(value, int | float) and not isinstance(value, bool):
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
