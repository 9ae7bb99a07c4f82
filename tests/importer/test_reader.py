"""Hostile trees and unlucky histories, imported end to end with the real model into an embedded Qdrant."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from importer.settings import Settings
from tests.importer.runs import run, run_settings, saved_state
from tests.importer.stored import stored_payloads

SESSION = "0b6f2d4e-5a1c-4d2e-9f3a-7c8b9d0e1f2a"


def _payloads(settings: Settings) -> list[dict[str, Any]]:
    assert settings.qdrant_path is not None
    return stored_payloads(settings.qdrant_path)


def _record(role: str, text: str, index: int = 0, cwd: str | None = "/home/dev/src/hardening") -> bytes:
    record: dict[str, Any] = {
        "type": role,
        "message": {"role": role, "content": [{"type": "text", "text": text}]},
        "timestamp": f"2026-12-01T10:{index // 60:02d}:{index % 60:02d}Z",
    }
    if cwd is not None:
        record["cwd"] = cwd
    return json.dumps(record).encode() + b"\n"


def _session(texts: list[str], cwd: str | None = "/home/dev/src/hardening") -> bytes:
    return b"".join(_record("user" if i % 2 == 0 else "assistant", t, i, cwd) for i, t in enumerate(texts))


def _write(path: Path, content: bytes) -> None:
    """Write and move the mtime on, as a later write would (some file systems keep whole seconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    before = path.stat().st_mtime if existed else 0.0
    path.write_bytes(content)
    if existed:
        os.utime(path, (before + 10, before + 10))


async def test_a_rewrite_that_keeps_the_first_4_kib_is_imported_again(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "projects"
    session = root / "-home-dev-src-hardening" / f"{SESSION}.jsonl"
    head = "The same long opening question about the deployment pipeline. " * 80  # over 4 KiB
    old_texts = [head] + [f"old answer number {i} about tomatoes in the garden" for i in range(11)]
    new_texts = [head] + [f"new answer number {i} about sailing boats at sea, rewritten" for i in range(14)]
    _write(session, _session(old_texts))
    settings = run_settings(root, tmp_path, chunk_messages=2)
    await run(settings)

    _write(session, _session(new_texts))  # same first record, the rest replaced, and longer than before
    stats = await run(settings)

    texts = " ".join(p["text"] for p in _payloads(settings))
    assert "tomatoes" not in texts
    assert all(f"new answer number {i} " in texts for i in range(14))
    state = saved_state(settings)[session.relative_to(root).as_posix()]
    assert stats.messages == state.messages == len(new_texts)
    assert len(_payloads(settings)) == state.chunks


async def test_a_fifo_is_skipped_and_counted(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "projects"
    folder = root / "-home-dev-src-hardening"
    _write(folder / f"{SESSION}.jsonl", _session(["imported although", "a fifo comes first"]))
    os.mkfifo(folder / "0-fifo.jsonl")  # sorts first: a blocking open would stop everything after it
    settings = run_settings(root, tmp_path)

    stats = await run(settings)

    assert stats.skipped == {"not_regular_file": 1}
    assert (stats.files, stats.messages, stats.failed) == (1, 2, 0)
    assert list(saved_state(settings)) == [f"-home-dev-src-hardening/{SESSION}.jsonl"]


async def test_a_name_that_is_not_utf8_is_skipped_and_counted(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "projects"
    folder = root / "-home-dev-src-hardening"
    _write(folder / f"{SESSION}.jsonl", _session(["imported although", "a bad name comes first"]))
    with open(os.fsencode(folder) + b"/caf\xe9.jsonl", "wb") as fh:  # Latin-1, as an old tool may write it
        fh.write(_session(["a name that is not UTF-8"]))
    settings = run_settings(root, tmp_path)

    stats = await run(settings)

    assert stats.skipped == {"undecodable_name": 1}
    assert (stats.files, stats.messages, stats.failed) == (1, 2, 0)
    assert list(saved_state(settings)) == [f"-home-dev-src-hardening/{SESSION}.jsonl"]


async def test_a_record_with_a_lone_surrogate_escape_is_embedded(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "projects"
    cut = b'{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"cut emoji \\ud83d"}'
    cut += b',{"type":"text","text":"and the block after it"}]},"cwd":"/home/dev/src/hardening"}\n'
    _write(root / "-p" / f"{SESSION}.jsonl", _session(["first question"]) + cut)
    settings = run_settings(root, tmp_path)

    stats = await run(settings)

    assert (stats.messages, stats.skipped) == (2, {})
    (payload,) = _payloads(settings)
    assert "cut emoji \ufffd\n\nand the block after it" in payload["text"]


async def test_the_same_session_id_in_two_project_folders_keeps_both(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "projects"
    for folder in ("-home-dev-a", "-home-dev-b"):
        # the same cwd: one collection, where only the point ids can tell the two files apart
        texts = [f"{folder} question {i}" for i in range(6)]
        _write(root / folder / f"{SESSION}.jsonl", _session(texts, cwd="/home/dev/same"))
    settings = run_settings(root, tmp_path, chunk_messages=2)

    stats = await run(settings)

    assert stats.chunks == len(_payloads(settings)) == sum(s.chunks for s in saved_state(settings).values()) == 6
    assert {p["conversation_id"] for p in _payloads(settings)} == {SESSION}


async def test_a_settled_cut_line_completed_later_is_counted(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "projects"
    session = root / "-p" / f"{SESSION}.jsonl"
    last = _record("assistant", "the answer that was being written", 2)
    _write(session, _session(["one", "two"]) + last[:25])
    settings = run_settings(root, tmp_path, settle_seconds=0)
    first = await run(settings)
    assert first.skipped == {"truncated_tail": 1}

    _write(session, _session(["one", "two"]) + last)  # its writer finished the line
    second = await run(settings)

    state = saved_state(settings)[session.relative_to(root).as_posix()]
    assert (first.messages, second.messages, state.messages) == (2, 1, 3)
    assert state.skipped == {}
    assert "being written" in " ".join(p["text"] for p in _payloads(settings))


async def test_deleted_files_keep_their_points_unless_pruning_is_asked_for(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "projects"
    kept = root / "-p" / f"{SESSION}.jsonl"
    deleted = root / "-p" / "deleted-session.jsonl"
    _write(kept, _session(["a conversation that stays"]))
    _write(deleted, _session(["a conversation the user deletes"]))
    settings = run_settings(root, tmp_path)
    await run(settings)
    deleted.unlink()

    default = await run(settings)
    assert default.pruned == 0
    assert "-p/deleted-session.jsonl" in saved_state(settings)
    assert {p["source"] for p in _payloads(settings)} == {"-p/deleted-session.jsonl", f"-p/{SESSION}.jsonl"}

    pruning = await run(run_settings(root, tmp_path, prune_deleted=True))
    assert pruning.pruned == 1
    assert list(saved_state(settings)) == [f"-p/{SESSION}.jsonl"]
    assert {p["source"] for p in _payloads(settings)} == {f"-p/{SESSION}.jsonl"}


async def test_pruning_an_empty_tree_deletes_nothing(model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "projects"
    session = root / "-p" / f"{SESSION}.jsonl"
    _write(session, _session(["on a volume that is later not mounted"]))
    settings = run_settings(root, tmp_path, prune_deleted=True)
    await run(settings)
    session.unlink()

    stats = await run(settings)

    assert stats.pruned == 0 and len(_payloads(settings)) == 1


async def test_a_session_without_cwd_moved_to_another_folder_leaves_no_duplicate_when_pruning(
    model_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "projects"
    before, after = root / "-old-folder" / f"{SESSION}.jsonl", root / "-new-folder" / f"{SESSION}.jsonl"
    _write(before, _session(["a session whose records carry no cwd", "so its folder names its project"], cwd=None))
    settings = run_settings(root, tmp_path, prune_deleted=True)
    await run(settings)
    after.parent.mkdir()
    before.rename(after)

    stats = await run(settings)

    assert (stats.files, stats.pruned) == (1, 1)
    assert {(p["project"], p["source"]) for p in _payloads(settings)} == {
        ("-new-folder", f"-new-folder/{SESSION}.jsonl")
    }
