"""The whole importer against the real model and an embedded Qdrant, on generated and real trees."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from importer.contract import RunNumbers, ShardSummary
from importer.pipeline import Importer, RunOptions
from importer.reader import discover
from importer.runner import make_embedder, make_sink
from importer.search import search
from importer.settings import Settings
from importer.state.file import FileStateStore
from importer.store import Point, Sink, all_points
from importer.store.edge import EdgeStore
from tests.importer.runs import run, run_settings, saved_state

Corpus = Callable[..., tuple[Path, dict[str, Any]]]
FAULT_REASONS = {
    "bad_json": "bad_json",
    "non_utf8": "non_utf8",
    "bom": "bom",
    "blank_lines": "blank_lines",
    "empty_file": "empty_file",
    "huge_line": "too_long",
}


def _summary(settings: Settings) -> ShardSummary:
    assert settings.state_file is not None
    return ShardSummary.model_validate(json.loads(settings.state_file.read_text())["summary"])


def _open_store(settings: Settings) -> EdgeStore:
    assert settings.qdrant_path is not None
    return EdgeStore.open(settings.qdrant_path, suffix="local", for_writing=False)


def _points(settings: Settings, source: str | None = None) -> int:
    store = _open_store(settings)
    try:
        return sum(store.count(name, source) for name in store.collections())
    finally:
        store.close()


def _append(path: Path, *texts: str) -> None:
    with path.open("ab") as fh:
        for i, text in enumerate(texts):
            role = "user" if i % 2 == 0 else "assistant"
            record = {
                "type": role,
                "message": {"role": role, "content": [{"type": "text", "text": text}]},
                "timestamp": f"2026-12-01T10:00:{i:02d}Z",
                "cwd": "/home/dev/projects/appended",
            }
            fh.write(json.dumps(record).encode() + b"\n")
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 10))


async def test_a_damaged_tree_imports_every_good_record_and_counts_the_damage(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, manifest = make_corpus(files=100, profile="small", seed=4, faults=True)
    settings = run_settings(root, tmp_path, max_line_bytes=1 << 20)
    stats = await run(settings)

    state = saved_state(settings)
    assert stats.files == manifest["files"] == len(state)
    assert stats.chunks == _points(settings) == sum(s.chunks for s in state.values())
    assert stats.messages == sum(s.messages for s in state.values())
    for entry in manifest["entries"]:
        got = state[entry["path"]]
        if "truncated_tail" in entry["faults"]:
            # the cut last record waits for its writer: everything before it is imported
            assert got.status == "partial"
            assert entry["text_messages"] - 1 <= got.messages <= entry["text_messages"], entry["path"]
        else:
            assert got.status == "done"
            assert got.messages == entry["text_messages"], entry["path"]
        for fault in entry["faults"]:
            if fault in FAULT_REASONS:
                assert got.skipped.get(FAULT_REASONS[fault], 0) >= 1, (entry["path"], fault)
    unexpected = {r for s in state.values() for r in s.skipped} - set(FAULT_REASONS.values())
    assert not unexpected


async def test_a_second_run_adds_nothing_and_an_append_imports_only_the_new_records(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, manifest = make_corpus(files=12, profile="small", seed=11)
    settings = run_settings(root, tmp_path)
    first = await run(settings)
    assert first.messages == manifest["text_messages"]
    points = _points(settings)

    first_summary = _summary(settings)
    assert (first_summary.run.chunks, first_summary.chunks) == (first.chunks, points)
    assert first_summary.run.messages == manifest["text_messages"]

    again = await run(settings)
    assert (again.files, again.messages, again.chunks, again.unchanged) == (0, 0, 0, len(manifest["entries"]))
    assert _points(settings) == points
    # The summary tells this run's numbers apart from the totals over every run.
    summary = _summary(settings)
    assert (summary.run.files_read, summary.run.chunks, summary.run.files_unchanged) == (0, 0, len(manifest["entries"]))
    assert (summary.chunks, summary.files_done, summary.phase) == (points, summary.files_total, "Succeeded")

    grown = manifest["entries"][0]["path"]
    before = saved_state(settings)[grown]
    _append(root / grown, "how do we rotate the signing keys?", "with a second key, then retire the first")
    appended = await run(settings)
    after = saved_state(settings)[grown]
    assert (appended.files, appended.messages) == (1, 2)
    assert after.messages == before.messages + 2
    assert after.consumed == (root / grown).stat().st_size
    assert _points(settings) == points - before.chunks + after.chunks
    # the short tail chunk was re-emitted complete with the same index: no point was duplicated
    assert _points(settings, grown) == after.chunks


async def test_a_rewritten_file_is_imported_whole_and_its_old_points_go(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, manifest = make_corpus(files=6, profile="small", seed=12)
    settings = run_settings(root, tmp_path)
    await run(settings)
    entries = manifest["entries"]
    target, donor = entries[0]["path"], entries[1]["path"]
    shutil.copyfile(root / donor, root / target)  # a different, shorter or longer, file in its place
    os.utime(root / target, None)
    stats = await run(settings)
    assert stats.files == 1
    assert saved_state(settings)[target].messages == entries[1]["text_messages"]
    assert _points(settings, target) == saved_state(settings)[target].chunks


async def test_a_related_query_finds_its_conversation_first(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, _ = make_corpus(files=10, profile="small", seed=13)
    session = root / "-home-dev-baking" / "5f1f3c1e-1111-4222-8333-944444444444.jsonl"
    session.parent.mkdir()
    session.touch()
    _append(
        session,
        "My sourdough starter smells like acetone and the loaves come out flat. What am I doing wrong?",
        "Feed the starter more often with equal weights of flour and water; a hungry starter makes dense bread.",
    )
    settings = run_settings(root, tmp_path)
    await run(settings)
    hits = await search(settings, "why is my bread dough not rising", limit=3)
    assert hits[0].source == session.relative_to(root).as_posix()
    assert hits[0].project == "appended"  # from the records' cwd, not the folder name
    assert hits[0].score > hits[1].score


async def test_real_sessions_import(real_sessions: Path, model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "projects" / "-test"
    root.mkdir(parents=True)
    for path in real_sessions.glob("*.jsonl"):
        shutil.copy(path, root / path.name)
    settings = run_settings(tmp_path / "projects", tmp_path)
    stats = await run(settings)
    assert stats.files == 3 and not stats.skipped
    assert stats.messages == sum(s.messages for s in saved_state(settings).values()) >= 3
    store = _open_store(settings)
    try:
        (collection,) = store.collections()
        payloads = [p.payload for page in all_points(store, collection) for p in page][:100]
    finally:
        store.close()
    required = {
        "text",
        "conversation_id",
        "chunk_index",
        "timestamp",
        "project",
        "start_role",
        "message_count",
    }
    extra = {"source", "git_branch", "is_sidechain", "tools_used", "files"}
    assert all(required | extra <= set(p or {}) for p in payloads)
    assert {p["project"] for p in payloads if p} == {"test"}
    sidechain = [p for p in payloads if p and p["source"].endswith("agent-session.jsonl")]
    assert sidechain and all(p["is_sidechain"] for p in sidechain)


async def test_shards_split_the_files_between_them(make_corpus: Corpus, model_dir: Path, tmp_path: Path) -> None:
    root, manifest = make_corpus(files=10, profile="small", seed=14)
    shards = [discover(root, i, 3) for i in range(3)]
    assert sorted(p for shard in shards for p in shard) == sorted(e["path"] for e in manifest["entries"])
    assert all(shards)
    total = 0
    for index in range(3):
        stats = await run(run_settings(root, tmp_path / f"s{index}", shard_index=index, shard_count=3))
        assert stats.files == len(shards[index])
        total += stats.messages
    assert total == manifest["text_messages"]


async def test_the_older_importers_state_file_is_migrated_without_re_embedding(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, manifest = make_corpus(files=8, profile="small", seed=15)
    paths = [e["path"] for e in manifest["entries"]]
    mtime = {p: (root / p).stat().st_mtime for p in paths}
    legacy: dict[str, Any] = {
        str(root / paths[0]): datetime.now(UTC).isoformat(),  # only an import time, after the file's mtime
        str(root / paths[1]): {"last_modified": mtime[paths[1]], "last_imported": 1, "chunks_imported": 4},
        f"/old/mount/{paths[2]}": {
            "imported_at": "2099-01-01T00:00:00",
            "last_modified": mtime[paths[2]],
            "chunks": 2,
        },
        str(root / paths[3]): {
            "last_modified": mtime[paths[3]] - 3600,
            "chunks_imported": 1,
        },  # changed since
    }
    settings = run_settings(root, tmp_path)
    assert settings.state_file is not None
    settings.state_file.write_text(json.dumps(legacy))
    stats = await run(settings)
    assert stats.unchanged == 3
    assert stats.files == len(paths) - 3
    state = saved_state(settings)
    assert state[paths[1]].chunks == 4 and state[paths[1]].status == "done"
    assert settings.state_file.with_name("state.json.legacy-backup").exists()
    assert (await run(settings)).files == 0


async def test_memory_budget_stops_with_state_saved_and_a_rerun_finishes(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, manifest = make_corpus(files=40, profile="small", seed=16)
    settings = run_settings(root, tmp_path, memory_limit=100 << 20, memory_fraction=0.5)
    stopped = await run(settings)
    assert stopped.stopped == "memory"
    saved = saved_state(settings)
    assert 1 <= len(saved) < len(manifest["entries"])
    finished = await run(run_settings(root, tmp_path))
    assert finished.unchanged == len(saved)
    assert sum(s.messages for s in saved_state(settings).values()) == manifest["text_messages"]


async def test_a_run_retried_after_its_memory_budget_counts_every_attempt_as_one_run(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    """The operator starts the same run again after an OOM kill: files the first attempt finished are this
    run's work, not unchanged, and the run's numbers equal one attempt's over the same tree."""
    root, manifest = make_corpus(files=40, profile="small", seed=17, faults=True)
    once = run_settings(root, tmp_path / "once", max_line_bytes=1 << 20, run_id="100")
    await run(once)
    expected = _summary(once).run

    retried = run_settings(root, tmp_path / "retried", max_line_bytes=1 << 20, run_id="200")
    stopped = await run(replace(retried, memory_limit=100 << 20, memory_fraction=0.5))
    assert stopped.stopped == "memory" and 1 <= stopped.files < len(manifest["entries"])
    first_seconds = _summary(retried).run.seconds
    second = await run(retried)
    # The second attempt reads only what the first left, and finds nothing unchanged: the rest is the run's.
    assert second.unchanged == 0 and second.files < len(manifest["entries"])
    run_numbers = _summary(retried).run
    assert run_numbers.model_dump(exclude={"seconds"}) == expected.model_dump(exclude={"seconds"})
    assert (run_numbers.files_read, run_numbers.files_unchanged) == (len(manifest["entries"]), 0)
    assert run_numbers.messages == sum(s.messages for s in saved_state(retried).values())
    assert run_numbers.chunks == _points(retried)
    assert run_numbers.skipped and run_numbers.seconds > first_seconds

    # The next run is another: everything is unchanged for it.
    await run(replace(retried, run_id="300"))
    assert _summary(retried).run.model_dump(exclude={"seconds"}) == {
        **RunNumbers().model_dump(exclude={"seconds"}),
        "files_unchanged": len(manifest["entries"]),
    }


class SinkWhoseSecondUpsertHangs:
    """The real embedded store, except that its second upsert blocks until the test releases it:
    a Qdrant call that hangs (a stalled connection, a stuck server). Everything else is the real store's."""

    def __init__(self, real: Sink) -> None:
        self.real = real
        self.hanging, self.release = threading.Event(), threading.Event()
        self.upserts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        self.upserts += 1
        if self.upserts == 2:
            self.hanging.set()
            self.release.wait()
        self.real.upsert(collection, points)


@pytest.mark.parametrize(("stop_seconds", "requests"), [(1.0, 1), (3600.0, 2)], ids=["deadline", "second-request"])
async def test_a_stop_abandons_a_hung_store_call_and_saves_what_was_acknowledged(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path, stop_seconds: float, requests: int
) -> None:
    root, manifest = make_corpus(files=24, profile="small", seed=31)
    settings = run_settings(root, tmp_path)
    embedder = make_embedder(settings)
    sink = SinkWhoseSecondUpsertHangs(make_sink(settings))
    assert settings.state_file is not None
    options = RunOptions(checkpoint_seconds=0, stop_seconds=stop_seconds)
    importer = Importer(
        root=root, embedder=embedder, sink=cast(Sink, sink), store=FileStateStore(settings.state_file), options=options
    )
    try:
        running = asyncio.create_task(importer.run())
        assert await asyncio.to_thread(sink.hanging.wait, 300), "no second upsert"
        for _ in range(requests):
            importer.request_stop("signal")
        # without the deadline this waits for the hung call forever
        stats = await asyncio.wait_for(running, 120)
        sink.close()  # the hung call is still blocked; the store's folder is free for the checks below
        assert (stats.stopped, stats.abandoned) == ("signal", True)
        saved = saved_state(settings)
        assert len(saved) < len(manifest["entries"])
        for rel, state in saved.items():  # only what Qdrant acknowledged was claimed
            assert _points(settings, rel) == state.chunks
    finally:
        sink.release.set()  # the abandoned call now fails on the closed client, in its own thread
        await embedder.aclose()
