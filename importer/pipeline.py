"""The import pipeline: read and chunk → embed → upsert → checkpoint, as three asyncio stages.

Bounded queues join the stages, so memory is bounded by the queue sizes, not by the tree, and
embedding (in a thread pool) never waits for Qdrant. Per-file markers travel through the queues in
order behind their file's chunks: when the upsert stage meets a file's ``FileDone``, every chunk of
that file has been acknowledged by Qdrant, and only then does the file's new state count as saved-worthy.

Stopping (SIGTERM, SIGINT, the memory budget): no new file is taken, the embedding of the window in
flight stops after its current batch (the window is dropped: its files are not acknowledged and resume
next run), and what is already embedded is written. If that is not done within ``stop_seconds`` (a hung
Qdrant call, say), or on a second stop request, the run abandons what is in flight: the blocked call is
left in its daemon thread, what was acknowledged is saved, and the run returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from importer.contract import RunNumbers, ShardSummary
from importer.embed.base import Embedder
from importer.memory import PeakRss, anonymous_bytes, release_memory
from importer.reader import ChunkItem, DeleteFile, FileDone, FileReader, Item, ReadLimits, discover, shard_of
from importer.state.base import DELETED, FileState, StateStore
from importer.store import Point, Sink

log = logging.getLogger(__name__)

#: Chunks gathered before embedding and sorted by length, so each batch pads to a similar length.
SORT_WINDOW = 128
#: Windows being embedded at once (see ``Importer._embed``).
_WINDOWS_IN_FLIGHT = 2
_YIELD_EVERY_LINES = 200


@dataclass(frozen=True)
class RunOptions:
    limits: ReadLimits = field(default_factory=ReadLimits)
    checkpoint_seconds: float = 5.0
    #: RSS above which the run checkpoints and stops with EXIT_MEMORY_BUDGET (None: no budget).
    memory_budget: int | None = None
    shard_index: int = 0
    shard_count: int = 1
    #: Delete the points and state of files gone from the tree (default: keep them searchable).
    prune_deleted: bool = False
    #: After a stop request, how long what is in flight may take before it is abandoned.
    stop_seconds: float = 10.0
    #: The run this process is an attempt of ("": a run of its own). Files it reads are stamped with it, and
    #: what an earlier attempt of the same run stamped counts as this run's work (see ``run_numbers``).
    run_id: str = ""


@dataclass
class RunStats:
    """What this process (one attempt of a run) did."""

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
    #: True when stopping had to abandon work in flight (a hung call, or a second stop request).
    abandoned: bool = False
    #: Files gone from the tree whose points and state were deleted (``prune_deleted``).
    pruned: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "pruned": self.pruned,
            "messages": self.messages,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "skipped": dict(sorted(self.skipped.items())),
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "stopped": self.stopped,
            "abandoned": self.abandoned,
        }

    def numbers(self, seconds: float) -> RunNumbers:
        """This attempt's numbers (``Importer.run_numbers`` adds the earlier attempts' of the same run)."""
        return RunNumbers(
            files_read=self.files,
            files_unchanged=self.unchanged,
            files_failed=self.failed,
            messages=self.messages,
            chunks=self.chunks,
            skipped=dict(sorted(self.skipped.items())),
            seconds=round(seconds, 3),
        )


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
        self._abandon = asyncio.Event()
        self._peak = PeakRss()
        self._files: list[str] = []
        self._started = time.monotonic()
        #: Files an earlier attempt of this run read (entries stamped with its id), not read again so far.
        self._earlier: dict[str, FileState] = {}
        #: What earlier attempts did to files this attempt read again (grown since, or failed then).
        self._carried = RunNumbers()
        #: Seconds the earlier attempts of this run took, as their last summary says.
        self._seconds_before = 0.0

    def request_stop(self, reason: str) -> None:
        """Take no new file; what is in flight is finished and saved, within ``stop_seconds``.

        A second request abandons what is in flight at once."""
        if self._stop.is_set():
            self._abandon.set()
        if not self.stats.stopped:
            self.stats.stopped = reason
        self._stop.set()

    async def run(self) -> RunStats:
        started = self._started = time.monotonic()
        self.state = await in_daemon_thread(self.store.load)
        found: Counter[str] = Counter()
        files = self._files = discover(self.root, self.options.shard_index, self.options.shard_count, found)
        self.stats.skipped.update(found)
        self._take_over_earlier_attempts(files)
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
            await self._until_done_or_abandoned(stages)
        finally:
            self.stats.seconds = time.monotonic() - started
            self.stats.peak_rss_mb = max(self._peak.peak, self._peak.sample()) / 2**20
            await self._checkpoint(phase=self._final_phase(), force=True)
        return self.stats

    def _take_over_earlier_attempts(self, files: list[str]) -> None:
        """After an OOM kill or an error the operator starts the same run again: what its earlier attempts
        saved is this run's work, so that the run's numbers cover all its attempts."""
        run_id = self.options.run_id
        if not run_id:
            return
        self._earlier = {rel: s for rel in files if (s := self.state.get(rel)) is not None and s.run_id == run_id}
        saved = self.store.saved_summary()
        if saved is not None and saved.run_id == run_id:
            self._seconds_before = saved.run.seconds

    async def _until_done_or_abandoned(self, stages: list[asyncio.Task[None]]) -> None:
        """Run the stages to their end, or until a stop request has waited ``stop_seconds`` (or a
        second one came): then cancel them, leaving any blocked call behind in its thread."""
        pipeline = asyncio.ensure_future(_gather_failing_fast(stages))
        deadline = asyncio.ensure_future(self._abandon_deadline())
        try:
            await asyncio.wait({pipeline, deadline}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            pipeline.cancel()  # the run itself was cancelled: its stages go with it
            raise
        finally:
            deadline.cancel()
        if not pipeline.done():
            log.warning("stopping: abandoning the work in flight", extra={"stop_seconds": self.options.stop_seconds})
            self.stats.abandoned = True
            pipeline.cancel()
            await asyncio.gather(pipeline, return_exceptions=True)
            return
        pipeline.result()  # a stage's error

    async def _abandon_deadline(self) -> None:
        await self._stop.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._abandon.wait(), self.options.stop_seconds)

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
            if self.options.prune_deleted:
                for item in self._prune_items(files):
                    await out.put(item)
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

    def _prune_items(self, files: list[str]) -> list[Item]:
        """Delete the points and state of this shard's files that are gone from the tree."""
        listed = set(files)
        gone = [
            rel
            for rel, state in self.state.items()
            if rel not in listed
            and state.status != DELETED
            and shard_of(rel, self.options.shard_count) == self.options.shard_index
            and not os.path.lexists(self.root / rel)
        ]
        if gone and not files:
            # An unmounted or empty volume looks exactly like a tree whose every file was deleted.
            log.warning("no session file found: nothing pruned", extra={"known_files": len(gone)})
            return []
        items: list[Item] = []
        for rel in sorted(gone):
            if self.state[rel].project:
                items.append(DeleteFile(self.sink.collection_for(self.state[rel].project), rel))
            items.append(FileDone(rel, FileState(status=DELETED), 0, 0, Counter(), outcome="pruned"))
        return items

    # -- stage 2: embed ---------------------------------------------------------------------------

    async def _embed(
        self,
        inbox: asyncio.Queue[Item | None],
        out: asyncio.Queue[tuple[list[Item], list[Any]] | None],
    ) -> None:
        window = max(SORT_WINDOW, self.embedder.call_size)
        # Two windows in flight: the next window's calls are queued while the last batches of the one
        # before run, so the embedder's workers do not idle at each window's end.  In order, so each
        # file's FileDone still follows its chunks.
        in_flight: deque[tuple[list[Item], asyncio.Task[list[Any] | None]]] = deque()
        finished = False
        try:
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
                in_flight.append((items, asyncio.create_task(self._vectors(items))))
                if len(in_flight) >= _WINDOWS_IN_FLIGHT:
                    await self._forward(*in_flight.popleft(), out)
            while in_flight:
                await self._forward(*in_flight.popleft(), out)
        finally:
            for _, task in in_flight:
                task.cancel()
        await out.put(None)

    @staticmethod
    async def _forward(
        items: list[Item],
        task: asyncio.Task[list[Any] | None],
        out: asyncio.Queue[tuple[list[Item], list[Any]] | None],
    ) -> None:
        vectors = await task
        if vectors is not None:
            await out.put((items, vectors))

    async def _vectors(self, items: list[Item]) -> list[Any] | None:
        """Vectors for the chunk items, in order; None when a stop request came before the last batch.

        Texts go to the model sorted by length, so that each batch pads to a similar length (less
        wasted work than padding short texts to long ones), in calls of the embedder's ``call_size`` (one
        batch per worker it runs side by side), all made at once so that the embedder always has work
        queued; a stop request cancels what has not started, so it waits for the batches running, not
        for the whole window.
        """
        texts = [item.text for item in items if isinstance(item, ChunkItem)]
        if not texts:
            return []
        if self._stop.is_set():
            return None
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        size = self.embedder.call_size
        # Every call of the window at once: the embedder queues their batches (see LocalEmbedder.embed).
        calls = asyncio.gather(
            *(
                self.embedder.embed([texts[i] for i in order[first : first + size]])
                for first in range(0, len(order), size)
            )
        )
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {calls, stop}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not calls.done():
                # Batches not started yet are dropped; those running end in their threads.
                calls.cancel()
                calls.add_done_callback(lambda call: call.cancelled() or call.exception())
        if not calls.done():
            return None  # the window is dropped: its files are not acknowledged and resume next run
        embedded = [vector for call in calls.result() for vector in call]
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
                    await in_daemon_thread(self.sink.delete_source, item.collection, item.source)
                else:
                    done.append(item)
            await self._write_points(points)
            for marker in done:
                await self._acknowledge(marker)

    async def _write_points(self, points: dict[str, list[Point]]) -> None:
        for collection, batch in points.items():
            await in_daemon_thread(self.sink.upsert, collection, batch)
            self.stats.chunks += len(batch)
        points.clear()

    async def _acknowledge(self, done: FileDone) -> None:
        """Every chunk of the file is in Qdrant: its new state may be saved."""
        if self.progress is not None:
            self.progress.update(1)
        if done.outcome == "unchanged":
            # Unless an earlier attempt of this run read it: then it counts with that attempt's work.
            self.stats.unchanged += done.source not in self._earlier
            return
        if done.outcome == "pruned":
            self.state.pop(done.source, None)
            self._dirty[done.source] = done.state
            self.stats.pruned += 1
            return
        state = self._stamped(done)
        self.state[done.source] = state
        self._dirty[done.source] = state
        self.stats.unchanged += done.outcome == "adopted"
        self.stats.failed += done.outcome == "failed"
        self.stats.files += done.outcome == "read"
        self.stats.messages += done.new_messages
        self.stats.bytes += done.bytes_read
        self.stats.skipped.update(done.skipped)
        self._watch_memory()
        await self._checkpoint(phase="Running")

    def _stamped(self, done: FileDone) -> FileState:
        """The file's new state, stamped as read by this run with what the run did to it over its attempts.

        A file an earlier attempt read and this one reads again counts once: its earlier numbers move from
        ``_earlier`` into ``_carried`` and this attempt's stats count the file."""
        run_id = self.options.run_id
        if not run_id or done.outcome not in ("read", "failed"):
            return done.state  # adopted: the older importer's work, unchanged for this run
        earlier = self._earlier.pop(done.source, None)
        before = run_numbers_of(earlier) if earlier is not None else RunNumbers()
        self._carried += before.model_copy(update={"files_read": 0, "files_failed": 0})
        skipped = Counter(before.skipped) + done.skipped
        return replace(
            done.state,
            run_id=run_id,
            run_messages=before.messages + done.new_messages,
            run_chunks=before.chunks + done.chunks,
            run_skipped=dict(sorted(skipped.items())),
        )

    def run_numbers(self) -> RunNumbers:
        """This run's numbers over all its attempts: this attempt's, plus the saved work of the earlier ones."""
        numbers = self.stats.numbers(self._seconds_before + time.monotonic() - self._started) + self._carried
        for state in self._earlier.values():
            numbers += run_numbers_of(state)
        return numbers

    def _watch_memory(self) -> None:
        now = time.monotonic()
        if now - self._last_release < 1.0:
            return  # a full collection costs milliseconds; once a second is enough to stay flat
        self._last_release = now
        release_memory()
        rss = self._peak.sample()
        budget = self.options.memory_budget
        if budget is not None and (held := anonymous_bytes()) > budget:
            extra = {"anonymous_mb": held >> 20, "rss_mb": rss >> 20, "budget_mb": budget >> 20}
            log.error("memory budget exceeded", extra=extra)
            self.request_stop("memory")

    async def _checkpoint(self, *, phase: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_save < self.options.checkpoint_seconds:
            return
        changes, self._dirty = self._dirty, {}
        try:
            await in_daemon_thread(self.store.save, changes, self.summary(phase))
        except BaseException:
            self._dirty = changes | self._dirty
            raise
        self._last_save = now

    def summary(self, phase: str) -> ShardSummary:
        """Totals over this shard's files as they are on disk now, and this run's numbers so far."""
        mine = [s for rel in self._files if (s := self.state.get(rel)) is not None]
        return ShardSummary(
            files_total=len(self._files),
            files_done=sum(s.status in ("done", "partial") for s in mine),
            files_failed=sum(s.status == "failed" for s in mine),
            chunks=sum(s.chunks for s in mine),
            bytes=sum(s.consumed for s in mine),
            phase=phase,
            updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            run_id=self.options.run_id,
            run=self.run_numbers(),
        )


def run_numbers_of(state: FileState) -> RunNumbers:
    """What the run that stamped ``state`` did to its file, over that run's attempts."""
    failed = state.status == "failed"
    return RunNumbers(
        files_read=int(not failed),
        files_failed=int(failed),
        messages=state.run_messages,
        chunks=state.run_chunks,
        skipped=dict(state.run_skipped),
    )


T = TypeVar("T")


async def in_daemon_thread(call: Callable[..., T], *args: Any) -> T:
    """Run a blocking call (a store or state call) in a thread of its own, and await its result.

    Unlike ``asyncio.to_thread`` the thread is a daemon, outside the default executor: if the call
    hangs, the run can stop waiting for it, and neither ``asyncio.run`` (which joins the default
    executor) nor the interpreter (which joins non-daemon threads) waits for it at exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(error: BaseException | None, result: Any) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            outcome: tuple[BaseException | None, Any] = (None, call(*args))
        except BaseException as error:  # handed to the awaiting task, which decides
            outcome = (error, None)
        # RuntimeError: the loop is closed, the run was abandoned and nobody waits for this result
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name=f"blocking-{getattr(call, '__name__', 'call')}", daemon=True).start()
    return await future


async def _gather_failing_fast(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for all stages; if one fails, cancel the others and raise its error."""
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
