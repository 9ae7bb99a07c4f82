"""export-to-server: every point of the embedded store reaches the server, idempotently, resuming after a stop.

No Qdrant server can run here, so qdrant-client's local mode stands in for one: the export goes through
the very ServerSink (qdrant-client calls, retries, collection and index creation) a server URL gets.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
from qdrant_client import QdrantClient

from importer.points import collection_name
from importer.store import Point
from importer.store.edge import EdgeStore
from importer.store.export import export, progress_file
from importer.store.server import ServerSink


def _fill(path: Path, per_project: dict[str, int]) -> dict[str, Point]:
    store = EdgeStore.open(path, suffix="local")
    points: dict[str, Point] = {}
    try:
        for project, count in per_project.items():
            name = collection_name(project, "local")
            batch = [
                Point(
                    id=str(uuid.uuid5(uuid.NAMESPACE_OID, f"{project}{i}")),
                    vector=[float((i * 7 + d) % 11) + 1.0 for d in range(384)],
                    payload={"project": project, "chunk_index": i, "source": f"{project}/s.jsonl", "text": f"t{i}"},
                )
                for i in range(count)
            ]
            store.upsert(name, batch)
            points.update({p.id: p for p in batch})
    finally:
        store.close()
    return points


def _stand_in_server(path: Path) -> ServerSink:
    return ServerSink(QdrantClient(path=str(path)), suffix="local", attempts=1)


def _server_points(server: ServerSink) -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, object]] = {}
    for name in server.collections():
        start: str | None = None
        while True:
            points, start = server.scroll(name, start=start, limit=100)
            found.update({p.id: p.payload for p in points})
            if start is None:
                break
    return found


class StopAfter:
    """A stand-in for a connection lost mid-export: the real sink, failing after ``pages`` upserts."""

    def __init__(self, sink: ServerSink, pages: int) -> None:
        self.sink, self.pages = sink, pages

    def upsert(self, collection: str, points: Sequence[Point]) -> None:
        if self.pages == 0:
            raise ConnectionError("lost the server")
        self.pages -= 1
        self.sink.upsert(collection, points)

    def __getattr__(self, name: str) -> object:
        return getattr(self.sink, name)


def test_export_copies_every_point_and_a_repeat_changes_nothing(tmp_path: Path) -> None:
    expected = _fill(tmp_path / "edge", {"alpha": 500, "beta": 30})
    source = EdgeStore.open(tmp_path / "edge", suffix="local", for_writing=False)
    server = _stand_in_server(tmp_path / "server")
    try:
        progress = progress_file(tmp_path / "edge", "http://stand-in")
        stats = export(source, server, progress, page=64)
        assert stats.points == {collection_name("alpha", "local"): 500, collection_name("beta", "local"): 30}
        assert _server_points(server) == {i: p.payload for i, p in expected.items()}
        assert not progress.exists()
        export(source, server, progress, page=64)  # idempotent: same ids overwrite
        assert sum(server.count(name) for name in server.collections()) == len(expected)
    finally:
        server.close()
        source.close()


def test_an_interrupted_export_resumes_where_it_stopped(tmp_path: Path) -> None:
    expected = _fill(tmp_path / "edge", {"alpha": 500})
    source = EdgeStore.open(tmp_path / "edge", suffix="local", for_writing=False)
    server = _stand_in_server(tmp_path / "server")
    progress = progress_file(tmp_path / "edge", "http://stand-in")
    try:
        with pytest.raises(ConnectionError):
            export(source, StopAfter(server, pages=3), progress, page=64)  # type: ignore[arg-type]
        assert progress.exists() and server.count(collection_name("alpha", "local")) == 3 * 64

        resumed = StopAfter(server, pages=100)
        stats = export(source, resumed, progress, page=64)  # type: ignore[arg-type]
        assert stats.points == {collection_name("alpha", "local"): 500 - 3 * 64}  # only what was missing
        assert set(_server_points(server)) == set(expected)
    finally:
        server.close()
        source.close()
