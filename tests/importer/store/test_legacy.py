"""A store written by earlier versions (qdrant-client's local mode) moves into the embedded store whole."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from importer.points import collection_name, point_id
from importer.store import StoreError, all_points
from importer.store.edge import EdgeStore
from importer.store.legacy import BACKUP, STAGING

REPO = Path(__file__).resolve().parents[3]


def _payload(project: str, index: int) -> dict[str, Any]:
    return {
        "text": f"chunk {index} of {project}: " + "words " * (index % 50),
        "conversation_id": f"session-{index // 10}",
        "chunk_index": index % 10,
        "timestamp": "2025-06-01T12:00:00Z",
        "project": project,
        "source": f"-home-{project}/session-{index // 10}.jsonl",
        "is_sidechain": index % 7 == 0,
        "tools_used": ["Read", "Edit"][: index % 3],
        "files": [],
    }


def _make_local_mode_store(path: Path, points_per_project: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Written the way the previous importer wrote it: QdrantClient(path=...), one collection per project."""
    rng = random.Random(7)
    expected: dict[str, dict[str, Any]] = {}
    client = QdrantClient(path=str(path))
    try:
        for project, count in points_per_project.items():
            name = collection_name(project, "local")
            config = models.VectorParams(size=384, distance=models.Distance.COSINE)
            client.create_collection(name, vectors_config=config)
            batch = []
            for index in range(count):
                vector = [rng.uniform(-1, 1) for _ in range(384)]
                ident = point_id(f"{project}/s{index // 10}", index % 10)
                batch.append(models.PointStruct(id=ident, vector=vector, payload=_payload(project, index)))
                expected[ident] = {"collection": name, "vector": vector, "payload": _payload(project, index)}
            client.upsert(name, batch[: count // 2])
            client.upsert(name, batch)  # half of them written twice: older rows must not come back
    finally:
        client.close()
    return expected


def _read_all(path: Path) -> dict[str, dict[str, Any]]:
    store = EdgeStore.open(path, suffix="local", for_writing=False)
    try:
        return {
            p.id: {"collection": name, "vector": p.vector, "payload": p.payload}
            for name in store.collections()
            for page in all_points(store, name)
            for p in page
        }
    finally:
        store.close()


def _same_direction(a: list[float], b: list[float]) -> bool:
    """Edge stores cosine vectors normalised, local mode as given: compare directions."""
    x, y = np.asarray(a), np.asarray(b)
    return bool(abs(float(x @ y) / (np.linalg.norm(x) * np.linalg.norm(y)) - 1) < 1e-5)


def test_the_first_open_for_writing_migrates_every_point(tmp_path: Path) -> None:
    store_path = tmp_path / "qdrant"
    expected = _make_local_mode_store(store_path, {"alpha": 300, "beta": 45})

    EdgeStore.open(store_path, suffix="local").close()

    found = _read_all(store_path)
    assert set(found) == set(expected)
    for ident, point in expected.items():
        assert found[ident]["collection"] == point["collection"]
        assert found[ident]["payload"] == point["payload"]
        assert _same_direction(found[ident]["vector"], point["vector"])
    assert (store_path / BACKUP / "meta.json").is_file()  # the old store is kept aside, untouched
    assert not (store_path / "meta.json").exists() and not (store_path / STAGING).exists()
    client = QdrantClient(path=str(store_path / BACKUP))
    try:
        assert sum(client.count(c.name).count for c in client.get_collections().collections) == len(expected)
    finally:
        client.close()


def test_search_refuses_an_old_store_and_names_the_command_that_migrates_it(tmp_path: Path) -> None:
    store_path = tmp_path / "qdrant"
    expected = _make_local_mode_store(store_path, {"gamma": 20})
    with pytest.raises(StoreError, match="python -m importer migrate --qdrant-path"):
        EdgeStore.open(store_path, suffix="local", for_writing=False)
    assert (store_path / "meta.json").exists()  # refused, not touched

    done = subprocess.run(
        [sys.executable, "-m", "importer", "migrate", "--qdrant-path", str(store_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert set(_read_all(store_path)) == set(expected)


def test_a_migration_that_crashed_after_copying_is_completed_by_the_next_open(tmp_path: Path) -> None:
    from importer.store import legacy

    store_path = tmp_path / "qdrant"
    expected = _make_local_mode_store(store_path, {"delta": 30})
    real_swap = legacy._swap_in

    def crash_between_renames(path: Path, staging: Path) -> None:
        (path / "meta.json").rename(path / "meta.json.crashed")  # as if killed half-way through the swap
        raise KeyboardInterrupt

    legacy._swap_in = crash_between_renames
    try:
        with pytest.raises(KeyboardInterrupt):
            EdgeStore.open(store_path, suffix="local")
    finally:
        legacy._swap_in = real_swap
    (store_path / "meta.json.crashed").rename(store_path / "meta.json")

    EdgeStore.open(store_path, suffix="local").close()
    assert set(_read_all(store_path)) == set(expected)
