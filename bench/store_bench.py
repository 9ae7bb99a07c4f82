"""Store benchmark: the embedded store (Qdrant Edge) against qdrant-client's local mode, in one run.

Prints numbers; asserts nothing. Both stores get the same points (384-d cosine vectors, ~1 KB payloads
shaped like the importer's, 8 projects) at each size:

- upsert rate (batches of 256, as the importer writes), stopping local mode once it passes
  ``--local-limit`` seconds (180: it then also skips the larger sizes);
- reopen: a fresh process opens the store; seconds until it answers a count, and its RSS then;
- top-10 query latency, median and p95 over ``--queries`` random queries, without and with a
  ``project == X`` filter; for Edge also after ``optimize()`` builds the index (up to ``--optimize-max``
  points: it blocks for a long time on big shards), with the seconds and peak RSS it cost.

Each measurement runs in its own process, so RSS figures are that store's alone.

    .venv/bin/python bench/store_bench.py                       # 20k, 100k, 300k points
    .venv/bin/python bench/store_bench.py --sizes 20000 --queries 20
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROJECTS = [f"project-{n}" for n in range(8)]
COLLECTION = "conv_bench000_local"
DIMENSIONS = 384
BATCH = 256


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def batches(count: int, seed: int = 0) -> Iterator[list[tuple[str, list[float], dict[str, Any]]]]:
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed)
    for start in range(0, count, BATCH):
        batch = []
        block = vectors.standard_normal((min(BATCH, count - start), DIMENSIONS), dtype=np.float32).tolist()
        for n in range(start, min(start + BATCH, count)):
            project = PROJECTS[n % len(PROJECTS)]
            payload = {
                "text": " ".join(rng.choice(["retry", "test", "qdrant", "import", "fix", "flaky"]) for _ in range(160)),
                "conversation_id": f"session-{n // 20}",
                "chunk_index": n % 20,
                "timestamp": f"2025-{1 + n % 12:02d}-01T12:00:00Z",
                "project": project,
                "source": f"-home-{project}/session-{n // 20}.jsonl",
                "is_sidechain": False,
                "tools_used": ["Read"],
                "files": [],
            }
            batch.append((str(uuid.UUID(int=rng.getrandbits(128), version=4)), block[n - start], payload))
        yield batch


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 2),
    }


# -- the two stores, as the importer uses them ------------------------------------------------------


class Edge:
    def __init__(self, path: Path, create: bool) -> None:
        import qdrant_edge as edge

        from importer.store.edge import create_shard

        self.edge = edge
        folder = path / COLLECTION
        self.shard = create_shard(folder, DIMENSIONS) if create else edge.EdgeShard.load(str(folder))

    def upsert(self, batch: list[tuple[str, list[float], dict[str, Any]]]) -> None:
        points = [self.edge.Point(i, v, p) for i, v, p in batch]
        self.shard.update(self.edge.UpdateOperation.upsert_points(points))

    def count(self) -> int:
        return int(self.shard.count(self.edge.CountRequest(exact=True)))

    def query(self, vector: list[float], project: str | None) -> None:
        condition = None
        if project is not None:
            match = self.edge.FieldCondition("project", match=self.edge.MatchValue(project))
            condition = self.edge.Filter(must=[match])
        request = self.edge.QueryRequest(
            limit=10, query=self.edge.Query.Nearest(vector), with_payload=True, filter=condition
        )
        self.shard.query(request)

    def optimize(self) -> None:
        self.shard.optimize()

    def close(self) -> None:
        self.shard.close()


class LocalMode:
    def __init__(self, path: Path, create: bool) -> None:
        from qdrant_client import QdrantClient, models

        self.models = models
        self.client = QdrantClient(path=str(path), force_disable_check_same_thread=True)
        if create:
            config = models.VectorParams(size=DIMENSIONS, distance=models.Distance.COSINE)
            self.client.create_collection(COLLECTION, vectors_config=config)

    def upsert(self, batch: list[tuple[str, list[float], dict[str, Any]]]) -> None:
        points = [self.models.PointStruct(id=i, vector=v, payload=p) for i, v, p in batch]
        self.client.upsert(COLLECTION, points=points, wait=True)

    def count(self) -> int:
        return int(self.client.count(COLLECTION, exact=True).count)

    def query(self, vector: list[float], project: str | None) -> None:
        condition = None
        if project is not None:
            match = self.models.FieldCondition(key="project", match=self.models.MatchValue(value=project))
            condition = self.models.Filter(must=[match])
        self.client.query_points(COLLECTION, query=vector, limit=10, with_payload=True, query_filter=condition)

    def optimize(self) -> None:
        raise NotImplementedError("local mode has no index")

    def close(self) -> None:
        self.client.close()


STORES: dict[str, Callable[[Path, bool], Any]] = {"edge": Edge, "local": LocalMode}


# -- one measurement per process --------------------------------------------------------------------


def child_write(kind: str, path: Path, count: int, limit: float) -> dict[str, Any]:
    store = STORES[kind](path, True)
    seconds = 0.0  # in upsert calls only: making the points is not the store's time
    written = 0
    peak = rss_mb()
    for batch in batches(count):
        started = time.monotonic()
        store.upsert(batch)
        seconds += time.monotonic() - started
        written += len(batch)
        peak = max(peak, rss_mb())
        if seconds > limit:
            break
    store.close()
    return {"written": written, "complete": written == count, "seconds": round(seconds, 1),
            "points_per_s": round(written / seconds), "peak_rss_mb": round(peak)}  # fmt: skip


def child_read(kind: str, path: Path, queries: int, optimize: bool) -> dict[str, Any]:
    started = time.monotonic()
    store = STORES[kind](path, False)
    count = store.count()
    result: dict[str, Any] = {"reopen_s": round(time.monotonic() - started, 2), "rss_after_reopen_mb": round(rss_mb())}
    result["count"] = count
    result.update(latencies(store, queries))
    if optimize:
        started = time.monotonic()
        store.optimize()
        result["optimize_s"] = round(time.monotonic() - started, 1)
        result["rss_after_optimize_mb"] = round(rss_mb())
        result["indexed"] = {f"{k}": v for k, v in latencies(store, queries).items()}
    result["peak_rss_mb"] = round(psutil.Process().memory_info().rss / 2**20)
    store.close()
    return result


def latencies(store: Any, queries: int) -> dict[str, Any]:
    rng = random.Random(99)
    vectors = [[rng.gauss(0, 1) for _ in range(DIMENSIONS)] for _ in range(queries)]
    store.query(vectors[0], None)  # warm-up: first use maps files
    out: dict[str, Any] = {}
    for label, project in (("query", None), ("query_filtered", PROJECTS[3])):
        samples = []
        for vector in vectors:
            started = time.perf_counter()
            store.query(vector, project)
            samples.append(time.perf_counter() - started)
        out[label] = percentiles(samples)
    return out


def in_child(*args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20000,100000,300000")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--local-limit", type=float, default=180.0, help="seconds of writing before local mode stops")
    parser.add_argument("--optimize-max", type=int, default=20000, help="run optimize() up to this many points")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        action, kind, path, number, extra = args.child
        if action == "write":
            print(json.dumps(child_write(kind, Path(path), int(number), float(extra))))
        else:
            print(json.dumps(child_read(kind, Path(path), int(number), extra == "1")))
        return

    local_gave_up = False
    for size in [int(s) for s in args.sizes.split(",")]:
        for kind in ("edge", "local"):
            if kind == "local" and local_gave_up:
                print(json.dumps({"store": kind, "points": size, "skipped": "a smaller size passed the limit"}))
                continue
            with tempfile.TemporaryDirectory(prefix=f"store-bench-{kind}-") as work:
                limit = args.local_limit if kind == "local" else 1e9
                write = in_child("write", kind, work, str(size), str(limit))
                local_gave_up = local_gave_up or (kind == "local" and not write["complete"])
                optimize = kind == "edge" and size <= args.optimize_max
                read = in_child("read", kind, work, str(args.queries), "1" if optimize else "0")
                print(json.dumps({"store": kind, "points": size, "write": write, "read": read}), flush=True)


if __name__ == "__main__":
    main()
