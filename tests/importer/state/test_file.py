"""The local state file: damaged, older or unexpected contents, its mode, and where it may live."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from dataclasses import replace
from pathlib import Path

import pytest

from importer.contract import RunNumbers, ShardSummary
from importer.state.base import LEGACY, FileState
from importer.state.file import FORMAT, FileStateStore

GOOD = FileState(size=10, mtime=1.0, head_hash="ab", head_size=10, prefix_hash="cd", consumed=10, offset=10)


def _current(files: object) -> str:
    return json.dumps({"format": FORMAT, "summary": {}, "files": files})


@pytest.mark.parametrize(
    "content",
    [
        pytest.param('{"format": "reflection-importer/state/v1", "files": {"a.jsonl": {"si', id="truncated"),
        pytest.param("", id="empty"),
        pytest.param('{"imported_files": ["/a.jsonl", "/b.jsonl"]}', id="older-format-with-a-list"),
        pytest.param(json.dumps({"format": FORMAT, "summary": {}}), id="no-files-key"),
        pytest.param("[1, 2]", id="a-list"),
        pytest.param(b"\xff\xfe{}".decode("latin-1"), id="not-utf8"),
    ],
)
def test_an_unreadable_state_is_moved_aside_with_a_warning(
    content: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_text(content, encoding="latin-1")

    with caplog.at_level(logging.WARNING):
        assert FileStateStore(path).load() == {}

    (aside,) = tmp_path.glob("state.json.corrupt-*")
    assert aside.read_text(encoding="latin-1") == content and not path.exists()
    assert any(getattr(r, "moved_to", None) == str(aside) for r in caplog.records)


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(5, id="a-number"),
        pytest.param({**GOOD.to_json(), "consumed": "abc"}, id="a-string-for-a-count"),
        pytest.param({**GOOD.to_json(), "mtime": float("inf")}, id="infinite-mtime"),
        pytest.param({**GOOD.to_json(), "chunks": -3}, id="negative"),
        pytest.param({**GOOD.to_json(), "status": "finished"}, id="unknown-status"),
        pytest.param({**GOOD.to_json(), "skipped": {"bad_json": "many"}}, id="bad-skip-counts"),
    ],
)
def test_an_entry_that_cannot_be_understood_is_dropped(entry: object, tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(_current({"bad.jsonl": entry, "good.jsonl": GOOD.to_json()}))
    assert FileStateStore(path).load() == {"good.jsonl": GOOD}


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"last_modified": 1.0, "chunks_imported": "abc"}, id="chunks-not-a-number"),
        pytest.param("Infinity", id="infinite-time-string"),
        pytest.param({"last_modified": float("inf")}, id="infinite-time"),
        pytest.param({"last_modified": time.time() + 86_400}, id="future-time"),
        pytest.param("2999-01-01T00:00:00", id="future-import-time"),
        pytest.param([1], id="a-list"),
    ],
)
def test_an_older_entry_that_cannot_be_trusted_is_dropped(value: object, tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"/logs/-p/bad.jsonl": value, "/logs/-p/good.jsonl": {"last_modified": 5.0}}))
    assert list(FileStateStore(path, source_root=Path("/logs")).load()) == ["-p/good.jsonl"]
    assert FileStateStore(path).load()["-p/good.jsonl"].status == LEGACY


def test_entries_saved_before_runs_had_ids_read_as_no_runs_work(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    unstamped = {k: v for k, v in GOOD.to_json().items() if not k.startswith("run_")}
    path.write_text(_current({"a.jsonl": unstamped}))
    store = FileStateStore(path)
    assert store.load() == {"a.jsonl": GOOD} and GOOD.run_id == ""
    assert store.saved_summary() == ShardSummary()


def test_the_summary_saved_last_is_there_for_the_next_attempt(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    stamped = replace(GOOD, run_id="1767607200", run_messages=4, run_chunks=2, run_skipped={"bad_json": 1})
    summary = ShardSummary(phase="MemoryBudget", run_id="1767607200", run=RunNumbers(files_read=1, seconds=7.5))
    FileStateStore(path).save({"a.jsonl": stamped}, summary)
    again = FileStateStore(path)
    assert again.saved_summary() is None  # nothing loaded yet
    assert again.load() == {"a.jsonl": stamped} and again.saved_summary() == summary
    path.write_text(json.dumps({"format": FORMAT, "summary": {"phase": 3}, "files": {}}))
    unreadable = FileStateStore(path)
    assert unreadable.load() == {} and unreadable.saved_summary() is None  # numbers only: not worth failing for


def test_a_save_keeps_the_files_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = FileStateStore(path)
    store.save({"a.jsonl": GOOD}, ShardSummary())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # new: private, it lists the user's conversations
    path.chmod(0o644)
    store.save({"b.jsonl": GOOD}, ShardSummary())
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_read_only_state_file_is_refused_before_the_run(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    FileStateStore(path).save({"a.jsonl": GOOD}, ShardSummary())
    path.chmod(0o444)
    before = path.read_bytes()
    with pytest.raises(PermissionError, match="read-only"):
        FileStateStore(path).load()
    with pytest.raises(PermissionError, match="read-only"):
        FileStateStore(path).save({"b.jsonl": GOOD}, ShardSummary())
    assert path.read_bytes() == before


def test_a_state_file_under_a_regular_file_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        FileStateStore(tmp_path / "plain" / "state.json").load()
    assert os.listdir(tmp_path) == ["plain"]
