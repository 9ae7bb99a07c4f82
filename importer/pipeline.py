"""The import pipeline: read and chunk → embed → upsert → checkpoint, as three asyncio stages.

Bounded queues join the stages, so memory is bounded by the queue sizes, not by the tree, and
embedding (in a thread pool) never waits for Qdrant. Per-file markers travel through the queues in
order behind their file's chunks: when the upsert stage meets a file's ``FileDone``, every chunk of
that file has been acknowledged by Qdrant, and only then does the file's new state count as saved-worthy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from importer.embed.base import Embedder
from importer.memory import PeakRss, release_memory
from importer.reader import ChunkItem, DeleteFile, FileDone, FileReader, Item, ReadLimits, discover
from importer.state.base import FileState, StateStore, Summary
from importer.store import Point, Sink

log = logging.getLogger(__name__)

#: Chunks gathered before embedding and sorted by length, so each batch pads to a similar length.
SORT_WINDOW = 128
_YIELD_EVERY_LINES = 200


@dataclass(frozen=True)
class RunOptions:
    limits: ReadLimits = field(default_factory=ReadLimits)
    checkpoint_seconds: float = 5.0
    #: RSS above which the run checkpoints and stops with EXIT_MEMORY_BUDGET (None: no budget).
    memory_budget: int | None = None
    shard_index: int = 0
    shard_count: int = 1


@dataclass
class RunStats:
    files: int = 0
    unchanged: int = 0
    failed: int = 0
    messages: int = 0
    chunks: int = 0
    bytes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    stopped: str = ""  # "", "signal" or "memory"

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "messages": self.messages,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "skipped": dict(sorted(self.skipped.items())),
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "stopped": self.stopped,
        }


class Importer:
    def __init__(
        self,
        *,
        root: Path,
        embedder: Embedder,
        sink: Sink,
        store: StateStore,
        options: RunOptions,
        progress: Any = None,
    ) -> None:
        self.root = root
        self.embedder = embedder
        self.sink = sink
        self.store = store
        self.options = options
        self.progress = progress
        self.stats = RunStats()
        self.reader = FileReader(root, options.limits, sink.collection_for)
        self.state: dict[str, FileState] = {}
        self._dirty: dict[str, FileState] = {}
        self._last_save = 0.0
        self._last_release = 0.0
        self._stop = asyncio.Event()
        self._peak = PeakRss()
        self._files: list[str] = []

    def request_stop(self, reason: str) -> None:
        """Take no new file; what is in flight is finished and saved."""
        if not self.stats.stopped:
            self.stats.stopped = reason
        self._stop.set()

    async def run(self) -> RunStats:
        started = time.monotonic()
        self.state = await asyncio.to_thread(self.store.load)
        files = self._files = discover(self.root, self.options.shard_index, self.options.shard_count)
        if self.progress is not None:
            self.progress.reset(total=len(files))
        to_embed: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=2 * SORT_WINDOW)
        to_upsert: asyncio.Queue[tuple[list[Item], list[Any]] | None] = asyncio.Queue(maxsize=2)
        stages = [
            asyncio.create_task(self._read(files, to_embed), name="read"),
            asyncio.create_task(self._embed(to_embed, to_upsert), name="embed"),
            asyncio.create_task(self._upsert(to_upsert), name="upsert"),
        ]
        try:
            await _gather_failing_fast(stages)
        finally:
            self.stats.seconds = time.monotonic() - started
            self.stats.peak_rss_mb = max(self._peak.peak, self._peak.sample()) / 2**20
            await self._checkpoint(phase=self._final_phase(), force=True)
        return self.stats

    def _final_phase(self) -> str:
        if self.stats.stopped == "memory":
            return "MemoryBudget"
        if self.stats.stopped == "signal":
            return "Interrupted"
        summary = self.summary("")
        return "Succeeded" if summary.files_done == summary.files_total else "Failed"

    # -- stage 1: read and chunk ------------------------------------------------------------------

    async def _read(self, files: list[str], out: asyncio.Queue[Item | None]) -> None:
        try:
            for rel in files:
                if self._stop.is_set():
                    break
                for count, item in enumerate(self.reader.items(rel, self.state.get(rel)), 1):
                    await out.put(item)
                    if count % _YIELD_EVERY_LINES == 0:
                        await asyncio.sleep(0)
                    if self._stop.is_set():
                        break  # the file is not marked done: the next run resumes it
                await asyncio.sleep(0)
        finally:
            await out.put(None)

    # -- stage 2: embed ---------------------------------------------------------------------------

    async def _embed(
        self,
        inbox: asyncio.Queue[Item | None],
        out: asyncio.Queue[tuple[list[Item], list[Any]] | None],
    ) -> None:
        window = max(SORT_WINDOW, self.embedder.batch_size)
        finished = False
        while not finished:
            items: list[Item] = []
            first = await inbox.get()
            if first is None:
                break
            if self._stop.is_set():
                continue  # stopping: what is not embedded yet is dropped; its files resume next run
            items.append(first)
            chunks = int(isinstance(first, ChunkItem))
            while chunks < window and not inbox.empty():
                nxt = inbox.get_nowait()
                if nxt is None:
                    finished = True
                    break
                items.append(nxt)
                chunks += isinstance(nxt, ChunkItem)
            await out.put((items, await self._vectors(items)))
        await out.put(None)

    async def _vectors(self, items: list[Item]) -> list[Any]:
        """Vectors for the chunk items, in order. Texts go to the model sorted by length, so that each
        batch pads to a similar length (less wasted work than padding short texts to long ones)."""
        texts = [item.text for item in items if isinstance(item, ChunkItem)]
        if not texts:
            return []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        embedded = await self.embedder.embed([texts[i] for i in order])
        vectors: list[Any] = [None] * len(texts)
        for position, original in enumerate(order):
            vectors[original] = embedded[position]
        return vectors

    # -- stage 3: upsert, acknowledge, checkpoint -------------------------------------------------

    async def _upsert(self, inbox: asyncio.Queue[tuple[list[Item], list[Any]] | None]) -> None:
        while (batch := await inbox.get()) is not None:
            items, vectors = batch
            points: dict[str, list[Point]] = {}
            done: list[FileDone] = []
            vector_iter = iter(vectors)
            for item in items:
                if isinstance(item, ChunkItem):
                    vector = next(vector_iter)
                    vector = vector if isinstance(vector, list) else vector.tolist()
                    points.setdefault(item.collection, []).append(
                        Point(id=item.id, vector=vector, payload=item.payload)
                    )
                elif isinstance(item, DeleteFile):
                    await self._write_points(points)
                    await asyncio.to_thread(self.sink.delete_source, item.collection, item.source)
                else:
                    done.append(item)
            await self._write_points(points)
            for marker in done:
                await self._acknowledge(marker)

    async def _write_points(self, points: dict[str, list[Point]]) -> None:
        for collection, batch in points.items():
            await asyncio.to_thread(self.sink.upsert, collection, batch)
            self.stats.chunks += len(batch)
        points.clear()

    async def _acknowledge(self, done: FileDone) -> None:
        """Every chunk of the file is in Qdrant: its new state may be saved."""
        if self.progress is not None:
            self.progress.update(1)
        if done.outcome == "unchanged":
            self.stats.unchanged += 1
            return
        self.state[done.source] = done.state
        self._dirty[done.source] = done.state
        self.stats.unchanged += done.outcome == "adopted"
        self.stats.failed += done.outcome == "failed"
        self.stats.files += done.outcome == "read"
        self.stats.messages += done.new_messages
        self.stats.bytes += done.bytes_read
        self.stats.skipped.update(done.skipped)
        self._watch_memory()
        await self._checkpoint(phase="Running")

    def _watch_memory(self) -> None:
        now = time.monotonic()
        if now - self._last_release < 1.0:
            return  # a full collection costs milliseconds; once a second is enough to stay flat
        self._last_release = now
        release_memory()
        rss = self._peak.sample()
        budget = self.options.memory_budget
        if budget is not None and rss > budget:
            log.error("memory budget exceeded", extra={"rss_mb": rss >> 20, "budget_mb": budget >> 20})
            self.request_stop("memory")

    async def _checkpoint(self, *, phase: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_save < self.options.checkpoint_seconds:
            return
        changes, self._dirty = self._dirty, {}
        try:
            await asyncio.to_thread(self.store.save, changes, self.summary(phase))
        except BaseException:
            self._dirty = changes | self._dirty
            raise
        self._last_save = now

    def summary(self, phase: str) -> Summary:
        """Totals over this shard's files as they are on disk now."""
        mine = [s for rel in self._files if (s := self.state.get(rel)) is not None]
        return Summary(
            files_total=len(self._files),
            files_done=sum(s.status in ("done", "partial") for s in mine),
            files_failed=sum(s.status == "failed" for s in mine),
            chunks=sum(s.chunks for s in mine),
            bytes=sum(s.consumed for s in mine),
            phase=phase,
            updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )


async def _gather_failing_fast(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for all stages; if one fails, cancel the others and raise its error."""
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
