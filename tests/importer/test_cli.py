"""``python -m importer`` as people and Jobs run it: a separate process, its output and exit codes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
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

from importer.contract import ExitCode
from importer.state.configmap import ConfigMapStateStore
from importer.store.edge import EdgeStore
from tests.polling import wait_for

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
    assert missing.returncode == ExitCode.FATAL and "--source" in missing.stderr
    both = _run(
        "run", env={"IMPORTER_SOURCE": str(tmp_path), "IMPORTER_QDRANT_URL": "http://x", "IMPORTER_QDRANT_PATH": "y"}
    )
    assert both.returncode == ExitCode.FATAL and "--qdrant-url" in both.stderr
    bad_number = _run("run", env={"IMPORTER_SOURCE": str(tmp_path), "IMPORTER_BATCH_SIZE": "many"})
    assert bad_number.returncode == ExitCode.FATAL and "IMPORTER_BATCH_SIZE" in bad_number.stderr


def test_an_unreachable_qdrant_fails_loudly_with_the_state_saved(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, _ = make_corpus(files=3, profile="small", seed=22)
    state = tmp_path / "s.json"
    failed = _run(
        "run", "--source", str(root), "--qdrant-url", f"http://127.0.0.1:{_closed_port()}",
        "--state-file", str(state), "--upsert-attempts", "2",
    )  # fmt: skip
    assert failed.returncode == ExitCode.FATAL
    assert "Qdrant" in failed.stderr and "2 times" in failed.stderr
    assert state.exists() and _state_files(state) == {}  # nothing acknowledged, nothing claimed


def _start(root: Path, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    command = _importer(
        "run", "--source", str(root), "--qdrant-path", str(tmp_path / "q"), "--state-file", str(tmp_path / "s.json"),
        "--json", "--checkpoint-seconds", "0", *extra,
    )  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_checkpoint(state: Path, process: subprocess.Popen[str]) -> None:
    def saved() -> dict[str, Any]:
        assert process.poll() is None, process.communicate()
        return _state_files(state)

    wait_for("a first checkpoint", saved, timeout=300, interval=0.05)


def test_sigterm_finishes_the_batch_in_flight_saves_and_exits(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, manifest = make_corpus(files=60, profile="small", seed=23)
    process = _start(root, tmp_path, "--stop-seconds", "2")
    _wait_for_first_checkpoint(tmp_path / "s.json", process)
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    out, err = process.communicate(timeout=120)
    took = time.monotonic() - signalled
    print(f"exit {took:.1f} s after SIGTERM")
    assert process.returncode == ExitCode.INTERRUPTED, err
    assert json.loads(out.strip().splitlines()[-1])["stopped"] == "signal"
    # the work in flight gets 2 s, then is abandoned: what is left is a save and the exit
    assert took < 15, f"exit {took:.1f} s after SIGTERM"
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

    def saved() -> Any:
        assert process.poll() is None, process.communicate()
        return state_backend.load()

    wait_for("a first checkpoint", saved, timeout=300, interval=0.1)
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


def test_version_is_the_installed_projects() -> None:
    done = _run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"reflection-importer {importlib.metadata.version('reflection-operator')}"


_LOG_ONE_LINE = (
    "import logging; from importer.cli import _configure_logging; _configure_logging(False); "
    "logging.getLogger('importer.test').warning('disk %s is slow', 'sda')"
)


def test_logs_are_json_lines_when_standard_error_is_not_a_terminal() -> None:
    done = subprocess.run([sys.executable, "-c", _LOG_ONE_LINE], cwd=REPO, capture_output=True, text=True, timeout=60)
    record = json.loads(done.stderr.strip())
    assert (record["levelname"], record["name"], record["message"]) == ("WARNING", "importer.test", "disk sda is slow")


def test_logs_are_plain_lines_on_a_terminal() -> None:
    controller, terminal = pty.openpty()
    try:
        process = subprocess.run([sys.executable, "-c", _LOG_ONE_LINE], cwd=REPO, stderr=terminal, timeout=60)
        os.close(terminal)
        terminal = -1
        output = _read_all(controller)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert process.returncode == 0
    line = output.strip()
    assert line.endswith("WARNING importer.test: disk sda is slow"), line
    assert not line.startswith("{")


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other end is closed and everything was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_a_file_that_cannot_be_read_gives_its_own_exit_code(
    make_corpus: Corpus, model_dir: Path, tmp_path: Path
) -> None:
    root, manifest = make_corpus(files=2, profile="small", seed=25)
    (root / manifest["entries"][0]["path"]).parent.joinpath("gone.jsonl").symlink_to(tmp_path / "nowhere")
    done = _run(
        "run", "--source", str(root), "--qdrant-path", str(tmp_path / "q"), "--state-file", str(tmp_path / "s.json"),
        "--json",
    )  # fmt: skip
    assert done.returncode == ExitCode.FILES_FAILED, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["failed"], summary["files"]) == (1, manifest["files"])
    assert "gone.jsonl" in done.stderr
