"""Wire settings to parts: the embedder, Qdrant, the state store; then run an import or a search."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from contextlib import AsyncExitStack

from tqdm import tqdm

from importer.embed.base import Embedder
from importer.memory import memory_limit
from importer.pipeline import Importer, RunOptions, RunStats, in_daemon_thread
from importer.reader import ReadLimits
from importer.search import open_store
from importer.settings import Settings
from importer.state.base import StateStore
from importer.state.file import FileStateStore
from importer.store import Sink

log = logging.getLogger(__name__)

#: After an abandoned run, how long closing the store may take: a call of it may still hang.
CLOSE_AFTER_ABANDON_SECONDS = 2.0


def make_embedder(settings: Settings) -> Embedder:
    if settings.provider == "voyage":
        from importer.embed.voyage import DEFAULT_MODEL, VoyageEmbedder

        return VoyageEmbedder(settings.model or DEFAULT_MODEL, base_url=settings.voyage_base_url)
    from importer.embed.local import LocalEmbedder
    from importer.model import DEFAULT_MODEL as LOCAL_MODEL

    if settings.model and settings.model != LOCAL_MODEL:
        raise ValueError(f"--model {settings.model!r}: the fastembed provider serves {LOCAL_MODEL} only")
    return LocalEmbedder(settings.model_dir, batch_size=settings.batch_size, threads=settings.workers)


def make_sink(settings: Settings) -> Sink:
    return open_store(settings, for_writing=True)


def make_store(settings: Settings) -> StateStore:
    if settings.state_configmap:
        from importer.state.configmap import ConfigMapStateStore

        assert settings.namespace is not None  # validated
        return ConfigMapStateStore.from_environment(
            settings.state_configmap,
            settings.namespace,
            run_name=settings.run_name,
            shard_index=settings.shard_index,
        )
    if settings.state_file is None:
        raise ValueError("give --state-file or --state-configmap: without state every run starts over")
    return FileStateStore(settings.state_file, source_root=settings.source)


def run_options(settings: Settings, embedder: Embedder) -> RunOptions:
    limit = memory_limit(settings.memory_limit)
    limits = ReadLimits(
        chunk_messages=settings.chunk_messages,
        max_chunk_chars=settings.max_chunk_chars or embedder.max_chars,
        max_line_bytes=settings.max_line_bytes,
        settle_seconds=settings.settle_seconds,
    )
    return RunOptions(
        limits=limits,
        checkpoint_seconds=settings.checkpoint_seconds,
        memory_budget=int(limit * settings.memory_fraction) if limit else None,
        shard_index=settings.shard_index,
        shard_count=settings.shard_count,
        prune_deleted=settings.prune_deleted,
        stop_seconds=settings.stop_seconds,
        run_id=settings.run_id,
    )


async def run_import(settings: Settings) -> RunStats:
    store = make_store(settings)
    async with AsyncExitStack() as stack:
        # The store before the model: a store held by another importer fails at once.
        sink = make_sink(settings)
        importers: list[Importer] = []  # filled below: closing depends on how the run ended
        stack.push_async_callback(_close_sink, sink, importers)
        embedder = make_embedder(settings)
        stack.push_async_callback(embedder.aclose)
        show_progress = settings.progress if settings.progress is not None else sys.stderr.isatty()
        progress = stack.enter_context(tqdm(unit="file", disable=not show_progress, dynamic_ncols=True))
        assert settings.source is not None  # validated
        importer = Importer(
            root=settings.source,
            embedder=embedder,
            sink=sink,
            store=store,
            options=run_options(settings, embedder),
            progress=progress,
        )
        importers.append(importer)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Stop taking files; what is in flight is finished and saved (a second signal: abandoned).
            loop.add_signal_handler(signum, importer.request_stop, "signal")
        log.info(
            "import started",
            extra={"source": str(settings.source), "store": sink.where, "provider": embedder.name},
        )
        stats = await importer.run()
        # The same numbers as the summary on standard output, as a log line for a log collector (kubectl logs).
        log.info("import ended", extra=stats.to_json())
        if not stats.stopped:
            # Only a run that finished: a stopped one is about to be killed or retried.
            await asyncio.to_thread(sink.finish)
        return stats
    raise AssertionError("unreachable")


async def _close_sink(sink: Sink, importers: list[Importer]) -> None:
    """Close the store; after an abandoned run a call of it may still hang, so closing may not wait."""
    if not any(importer.stats.abandoned for importer in importers):
        sink.close()
        return
    with contextlib.suppress(Exception):  # the run's outcome is already decided; the close is best effort
        try:
            await asyncio.wait_for(in_daemon_thread(sink.close), CLOSE_AFTER_ABANDON_SECONDS)
        except TimeoutError:
            log.warning("the store did not close in time; leaving it", extra={"seconds": CLOSE_AFTER_ABANDON_SECONDS})
