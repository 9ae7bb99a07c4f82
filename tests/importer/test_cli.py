"""``python -m importer`` as people and Jobs run it: a separate process, its output and exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from importer.settings import EXIT_FATAL, EXIT_INTERRUPTED
from importer.state.configmap import ConfigMapStateStore
from importer.store.edge import EdgeStore

REPO = Path(__file__).resolve().parents[2]
Corpus = Callable[..., tuple[Path, dict[str, Any]]]


def _importer(*args: str) -> list[str]:
    return [sys.executable, "-m", "importer", *args]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(_importer(*args), cwd=REPO, capture_output=True, text=True, env=environment, timeout=600)


def _state_files(path: Path) -> dict[str, Any]:
    files: dict[str, Any] = json.loads(path.read_text())["files"] if path.exists() else {}
    return files


def _points(qdrant: Path) -> int:
    store = EdgeStore.open(qdrant, suffix="local", for_writing=False)
    try:
        return sum(store.count(name) for name in store.collections())
    finally:
        store.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_json_contract(make_corpus: Corpus, model_dir: Path, tmp_path: Path) -> None:
    root, manifest = make_corpus(files=8, profile="small", seed=21, faults=True)
    done = _run(
        "run", "--source", str(root), "--qdrant-path", str(tmp_path / "q"), "--state-file", str(tmp_path / "s.json"),
        "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"files", "messages", "chunks", "skipped", "seconds", "peak_rss_mb"} <= set(summary)
    assert summary["files"] == manifest["files"]
    assert summary["chunks"] == _points(tmp_path / "q")
    assert isinstance(summary["skipped"], dict) and summary["skipped"].get("empty_file") == 1
    assert 0 < summary["peak_rss_mb"] < 2000


def test_settings_come_from_the_environment_and_errors_name_them(tmp_path: Path) -> None:
    missing = _run("run", "--json", env={"IMPORTER_SOURCE": str(tmp_path / "nowhere")})
    assert missing.returncode == EXIT_FATAL and "--source" in missing.stderr
    both = _run(
        "run", env={"IMPORTER_SOURCE": str(tmp_path), "IMPORTER_QDRANT_URL": "http://x", "IMPORTER_QDRANT_PATH": "y"}
    )
    assert both.returncode == EXIT_FATAL and "--qdrant-url" in both.stderr
    bad_number = _run("run", env={"IMPORTER_SOURCE": str(tmp_path), "IMPORTER_BATCH_SIZE": "many"})
    assert bad_number.returncode == EXIT_FATAL and "IMPORTER_BATCH_SIZE" in bad_number.stderr


def test_an_unreachable_qdrant_fails_loudly_with_the_state_saved(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, _ = make_corpus(files=3, profile="small", seed=22)
    state = tmp_path / "s.json"
    failed = _run(
        "run", "--source", str(root), "--qdrant-url", f"http://127.0.0.1:{_closed_port()}",
        "--state-file", str(state), "--upsert-attempts", "2",
    )  # fmt: skip
    assert failed.returncode == EXIT_FATAL
    assert "Qdrant" in failed.stderr and "2 times" in failed.stderr
    assert state.exists() and _state_files(state) == {}  # nothing acknowledged, nothing claimed


def _start(root: Path, tmp_path: Path) -> subprocess.Popen[str]:
    command = _importer(
        "run", "--source", str(root), "--qdrant-path", str(tmp_path / "q"), "--state-file", str(tmp_path / "s.json"),
        "--json", "--checkpoint-seconds", "0",
    )  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_checkpoint(state: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if _state_files(state):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint within 300 s")


def test_sigterm_finishes_the_batch_in_flight_saves_and_exits(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, manifest = make_corpus(files=60, profile="small", seed=23)
    process = _start(root, tmp_path)
    _wait_for_first_checkpoint(tmp_path / "s.json", process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, err
    assert json.loads(out.strip().splitlines()[-1])["stopped"] == "signal"
    saved = _state_files(tmp_path / "s.json")
    assert 0 < len(saved) < len(manifest["entries"])

    resumed = _run(
        "run", "--source", str(root), "--qdrant-path", str(tmp_path / "q"), "--state-file", str(tmp_path / "s.json"),
        "--json",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["unchanged"] == len(saved)
    files = _state_files(tmp_path / "s.json")
    assert sum(f["messages"] for f in files.values()) == manifest["text_messages"]


@pytest.fixture(params=["file", "configmap"])
def state_backend(request: pytest.FixtureRequest, tmp_path: Path) -> StateBackend:
    """Where a run keeps its state: a local file, or ConfigMaps on the real kube-apiserver."""
    if request.param == "file":
        return StateBackend(["--state-file", str(tmp_path / "s.json")], {}, lambda: _state_files(tmp_path / "s.json"))
    cluster = request.getfixturevalue("kube_cluster")
    namespace = request.getfixturevalue("namespace")
    env = {"KUBECONFIG": str(cluster.kubeconfig)}

    def load() -> dict[str, Any]:
        store = ConfigMapStateStore.from_environment("killed-state", namespace)
        return {k: v.to_json() for k, v in store.load().items()}

    args = ["--state-configmap", "killed-state", "--namespace", namespace, "--run-name", "killed"]
    return StateBackend(args, env, load)


@dataclass
class StateBackend:
    args: list[str]
    env: dict[str, str]
    load: Callable[[], dict[str, Any]]


def test_killed_mid_run_and_restarted_imports_every_record_once(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path, state_backend: StateBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in state_backend.env.items():
        monkeypatch.setenv(name, value)
    root, manifest = make_corpus(files=60, profile="small", seed=24)
    command = _importer(
        "run", "--source", str(root), "--qdrant-path", str(tmp_path / "q"), "--json", "--checkpoint-seconds", "0",
        *state_backend.args,
    )  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state_backend.load():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert len(state_backend.load()) < len(manifest["entries"])

    resumed = _run("run", "--source", str(root), "--qdrant-path", str(tmp_path / "q"), "--json", *state_backend.args)
    assert resumed.returncode == 0, resumed.stderr
    files = state_backend.load()
    assert sorted(files) == sorted(e["path"] for e in manifest["entries"])
    assert sum(f["messages"] for f in files.values()) == manifest["text_messages"]
    # deterministic ids: what the killed run wrote was overwritten, not duplicated
    assert _points(tmp_path / "q") == sum(f["chunks"] for f in files.values())
