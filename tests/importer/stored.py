"""What an embedded store holds, read back through the project's own store code (for assertions)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from importer.store import Point, all_points
from importer.store.edge import EdgeStore


@contextmanager
def embedded_store(path: Path, suffix: str = "local") -> Iterator[EdgeStore]:
    store = EdgeStore.open(path, suffix=suffix, for_writing=False)
    try:
        yield store
    finally:
        store.close()


def stored_points(path: Path, suffix: str = "local") -> dict[str, list[Point]]:
    """Every point of every collection of this provider, by collection."""
    with embedded_store(path, suffix) as store:
        return {name: [p for page in all_points(store, name) for p in page] for name in store.collections()}


def stored_payloads(path: Path, suffix: str = "local") -> list[dict[str, Any]]:
    return [point.payload for points in stored_points(path, suffix).values() for point in points]
