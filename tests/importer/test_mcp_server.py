"""``python -m importer mcp`` spoken to by the MCP SDK's own client over stdio, against a store the real importer
wrote; while it runs, an import into the same store still succeeds (it waits for the server to release the
store, which it does after a few seconds without a call)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

REPO = Path(__file__).resolve().parents[2]


def _server(store: Any) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "importer", "mcp", *store.args()], cwd=REPO)


async def _call(session: ClientSession, tool: str, **arguments: Any) -> list[dict[str, Any]]:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    found: list[dict[str, Any]] = result.structured_content["result"]
    return found


async def test_search_and_conversation_tools_over_stdio(searchable_store: Any, tmp_path: Path) -> None:
    async with stdio_client(_server(searchable_store)) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert set(tools) == {"search", "conversation"}
        assert set(tools["search"].input_schema["properties"]) == {
            "query",
            "limit",
            "project",
            "since",
            "prefer_recent",
        }

        hits = await _call(session, "search", query="why did my dough stay flat", limit=3)
        assert 1 <= len(hits) <= 3
        best = hits[0]
        assert best["session_file"] == "-home-ann-bakery/s1.jsonl" and best["project"] == "bakery"
        assert best["messages"][0] == {"role": "user", "text": BAKERY_FIRST}
        assert {h["project"] for h in await _call(session, "search", query="dough", since="2w")} == {"infra"}
        assert {h["project"] for h in await _call(session, "search", query="dough", project="infra")} == {"infra"}
        recent_first = await _call(session, "search", query="why did my dough stay flat", prefer_recent="7d")
        assert recent_first[0]["project"] == "infra"

        around = await _call(
            session, "conversation", session_file=best["session_file"], chunk_index=best["chunk_index"], around=1
        )
        assert [m["in_hit"] for m in around] == [True] * 5 + [False]
        assert around[0]["text"] == BAKERY_FIRST and around[0]["timestamp"] == "2025-01-10T09:00:00Z"

        # The server holds the store for a few idle seconds after a call: an import waits for it, then runs.
        command = [sys.executable, "-m", "importer", "run", "--source", str(searchable_store.source)]
        command += ["--qdrant-path", str(searchable_store.qdrant), "--state-file", str(tmp_path / "state.json")]
        imported = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert imported.returncode == 0, imported.stderr[-2000:]
        assert (await _call(session, "search", query="why did my dough stay flat", limit=1))[0] == best

        missing = await session.call_tool("conversation", {"session_file": "../../etc/passwd", "chunk_index": 0})
        assert missing.is_error


BAKERY_FIRST = "Why is my bread dough not rising? It sat for three hours and stayed flat."
