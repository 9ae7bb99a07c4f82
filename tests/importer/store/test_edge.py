"""The embedded store (Qdrant Edge) as the importer and a person use it: crash safety, one writer at a time,
a missing store, and no qdrant-client in the process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from importer.contract import ExitCode
from importer.store import Point, StoreBusy, all_points
from importer.store.edge import EdgeStore

REPO = Path(__file__).resolve().parents[3]
Corpus = Callable[..., tuple[Path, dict[str, Any]]]


def _importer(*args: str) -> list[str]:
    return [sys.executable, "-m", "importer", *args]


def _run(*args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, *python_flags, "-m", "importer", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def _import_args(root: Path, work: Path) -> list[str]:
    return ["run", "--source", str(root), "--qdrant-path", str(work / "q"), "--state-file", str(work / "s.json")]


def _point_set(qdrant: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every point as id -> (collection, payload)."""
    store = EdgeStore.open(qdrant, suffix="local", for_writing=False)
    try:
        return {
            point.id: (name, point.payload)
            for name in store.collections()
            for page in all_points(store, name)
            for point in page
        }
    finally:
        store.close()


def test_kill_9_mid_run_then_a_rerun_gives_the_same_points_as_a_clean_run(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, _ = make_corpus(files=40, profile="small", seed=81)
    clean = _run(*_import_args(root, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr

    killed = tmp_path / "killed"
    command = _importer(*_import_args(root, killed), "--checkpoint-seconds", "0")
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # Killed once some files are acknowledged (state saved) and the run is still writing.
    while not (killed / "s.json").exists() or not json.loads((killed / "s.json").read_text())["files"]:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL

    rerun = _run(*_import_args(root, killed))
    assert rerun.returncode == 0, rerun.stderr
    expected = _point_set(tmp_path / "clean" / "q")
    assert expected and _point_set(killed / "q") == expected


def test_a_second_importer_on_the_same_folder_fails_at_once_with_a_clear_message(
    make_corpus: Corpus, tmp_path: Path
) -> None:
    root, _ = make_corpus(files=2, profile="small", seed=82)
    holder = EdgeStore.open(tmp_path / "q", suffix="local")  # the first importer, as far as the folder knows
    try:
        second = _run(*_import_args(root, tmp_path))
    finally:
        holder.close()
    assert second.returncode == ExitCode.FATAL
    assert "in use by pid" in second.stderr and str(os.getpid()) in second.stderr
    assert not (tmp_path / "s.json").exists()  # it stopped before reading anything


def test_an_import_waits_for_a_search_holding_the_store_but_a_search_does_not_wait_for_an_import(
    tmp_path: Path,
) -> None:
    EdgeStore.open(tmp_path / "q", suffix="local").close()
    search = EdgeStore.open(tmp_path / "q", suffix="local", for_writing=False)
    released = threading.Event()

    def release_soon() -> None:
        time.sleep(0.5)
        released.set()
        search.close()

    releaser = threading.Thread(target=release_soon)
    releaser.start()
    importing = EdgeStore.open(tmp_path / "q", suffix="local")  # waits for the search instead of failing
    releaser.join()
    try:
        assert released.is_set()
        with pytest.raises(StoreBusy, match=rf"in use by pid {os.getpid()} \(an import\)"):
            EdgeStore.open(tmp_path / "q", suffix="local", for_writing=False)
    finally:
        importing.close()


def test_an_edge_shard_opened_elsewhere_is_a_clear_error_not_wouldblock(tmp_path: Path) -> None:
    """Edge's own lock (its write-ahead log) is the second line of defence; its error is turned into ours."""
    first = EdgeStore.open(tmp_path / "q", suffix="local")
    first.upsert("conv_a_local", [Point(id="00000000-0000-4000-8000-000000000001", vector=[1.0] * 384, payload={})])
    # Bypass the folder lock as a process that does not use it would (e.g. an older importer).
    probe = (
        "import sys; from pathlib import Path; from importer.store.edge import EdgeStore, FolderLock; "
        "store = EdgeStore(Path(sys.argv[1]), suffix='local', lock=FolderLock(Path(sys.argv[1]))); "
        "store.count('conv_a_local')"
    )
    try:
        done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "q")], capture_output=True, text=True)
    finally:
        first.close()
    assert done.returncode != 0
    assert "StoreBusy" in done.stderr and "open in another process" in done.stderr


def test_search_on_a_store_that_does_not_exist_says_so_and_creates_nothing(model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here" / "qdrant"
    done = _run("search", "--qdrant-path", str(missing), "anything")
    assert done.returncode == ExitCode.FATAL
    assert "does not exist" in done.stderr and str(missing) in done.stderr
    assert not (tmp_path / "nothing-here").exists()


def test_an_import_into_the_embedded_store_never_imports_qdrant_client(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    """``-X importtime`` lists every module the interpreter imported, on standard error."""
    root, _ = make_corpus(files=3, profile="small", seed=83)
    done = _run(*_import_args(root, tmp_path), "--json", python_flags=("-X", "importtime"))
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "importer.store.edge" in imported and "qdrant_edge" in imported  # the listing is real
    assert not {name for name in imported if name.split(".")[0] == "qdrant_client"}
    assert json.loads(done.stdout.strip().splitlines()[-1])["chunks"] > 0

    searched = _run("search", "--qdrant-path", str(tmp_path / "q"), "a question", python_flags=("-X", "importtime"))
    assert searched.returncode == 0, searched.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in searched.stderr.splitlines()}
    assert "qdrant_edge" in imported and "qdrant_client" not in imported and "fastembed" not in imported
