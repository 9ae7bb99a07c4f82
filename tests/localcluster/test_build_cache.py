"""The build cache only counts a build as finished when its marker and every binary are in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localcluster import build


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return build.cache_dir()


def _install_fake_binaries(cache: Path) -> None:
    (cache / "bin").mkdir(parents=True)
    for name in build.BINARIES:
        path = cache / "bin" / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)


def _write_marker(cache: Path) -> None:
    (cache / build.MARKER_NAME).write_text(json.dumps({"binaries": list(build.BINARIES)}))


def test_cache_lives_under_xdg_cache_home(cache: Path, tmp_path: Path) -> None:
    assert cache == tmp_path / "reflection-operator" / "k8s-v1.20.2"
    assert build.bin_dir() == cache / "bin"


def test_binaries_without_a_marker_are_a_half_finished_build(cache: Path) -> None:
    _install_fake_binaries(cache)
    assert not build.is_built()


def test_marker_and_all_binaries_make_a_finished_build(cache: Path) -> None:
    _install_fake_binaries(cache)
    _write_marker(cache)
    assert build.is_built()
    assert build.ensure_built() == cache / "bin"  # found in the cache: nothing is built


def test_a_missing_binary_or_a_broken_marker_means_rebuild(cache: Path) -> None:
    _install_fake_binaries(cache)
    _write_marker(cache)
    (cache / "bin" / "kubectl").unlink()
    assert not build.is_built()
    kubectl = cache / "bin" / "kubectl"
    kubectl.write_text("#!/bin/sh\n")
    kubectl.chmod(0o755)
    assert build.is_built()
    (cache / build.MARKER_NAME).write_text("{not json")
    assert not build.is_built()
