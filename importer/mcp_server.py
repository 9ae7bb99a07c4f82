"""``python -m importer mcp``: Claude Code searches its own past conversations over MCP (stdio).

Two tools: ``search`` (the same search as ``python -m importer search``, same store and settings) and
``conversation`` (the messages around a hit, read from the session file under ``--source``). The query
model is loaded once, when the server starts. An embedded store admits one process at a time, so the server
opens it at a call and closes it after ``--release-store-after`` seconds without one: an assistant's searches
in quick succession reuse it, and an import started meanwhile waits for it. ``--hold-store`` never releases it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer

from importer.search import Searcher, SearchFilter, messages_around, parse_half_life, parse_since
from importer.settings import Settings

#: Where Claude Code keeps its sessions: the default ``--source`` for reading a conversation.
CLAUDE_PROJECTS = Path.home() / ".claude" / "projects"
INSTRUCTIONS = (
    "Search the user's past Claude Code conversations (all projects) by meaning. `search` returns the best "
    "moments, each with its session_file and chunk_index; `conversation` returns the messages around one of them."
)


def build_server(settings: Settings, *, idle_seconds: float | None) -> MCPServer[Any]:
    if settings.source is None and CLAUDE_PROJECTS.is_dir():
        settings.source = CLAUDE_PROJECTS
    searcher: Searcher | None = None

    @asynccontextmanager
    async def lifespan(server: MCPServer[Any]) -> AsyncIterator[None]:
        nonlocal searcher
        # Loaded before the first call, so every search is warm.
        # ``idle_seconds`` None: the store stays open. A server has no one-process lock: its connection is kept.
        searcher = await Searcher.open(settings, idle_seconds=idle_seconds if settings.qdrant_path else None)
        try:
            yield
        finally:
            await searcher.aclose()

    server: MCPServer[Any] = MCPServer("reflection", instructions=INSTRUCTIONS, lifespan=lifespan)

    @server.tool()
    async def search(
        query: str,
        limit: int = 5,
        project: str | None = None,
        since: str | None = None,
        prefer_recent: str | None = None,
    ) -> list[dict[str, Any]]:
        """Past conversation moments about `query`, best first. `project`: only that project (the last folder
        of its working directory); `since`: only moments since a duration ago (2w, 3d, 12h) or a date;
        `prefer_recent`: rank recent moments higher, a moment this old (30d, 2w) counting half as much as one
        from now (off unless given)."""
        assert searcher is not None  # set by the lifespan
        wanted = SearchFilter(project=project, since=parse_since(since) if since else None)
        half_life = parse_half_life(prefer_recent) if prefer_recent else None
        hits = await searcher.search(query, limit=max(1, min(limit, 50)), wanted=wanted, recent_half_life=half_life)
        return [_brief(hit.to_json()) for hit in hits]

    @server.tool()
    async def conversation(session_file: str, chunk_index: int, around: int = 5) -> list[dict[str, Any]]:
        """The messages of a search hit (`in_hit`) and `around` messages before and after it, in order, from
        its session file (`session_file` and `chunk_index` as `search` returned them)."""
        found = await asyncio.to_thread(messages_around, settings, session_file, chunk_index, max(0, around))
        return [asdict(message) for message in found]

    return server


def _brief(hit: dict[str, Any]) -> dict[str, Any]:
    """A hit as the model reads it: the chunk's text once (as messages), no empty fields."""
    hit.pop("text", None)
    return {key: value for key, value in hit.items() if value not in ("", [], None)}


def serve(settings: Settings, *, idle_seconds: float | None) -> None:
    build_server(settings, idle_seconds=idle_seconds).run("stdio")
