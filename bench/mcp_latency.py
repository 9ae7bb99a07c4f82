"""How long a warm ``search`` takes through the MCP server, as Claude Code calls it (stdio, the SDK's client).

    .venv/bin/python bench/mcp_latency.py --qdrant-path STORE [--calls 30]

Starts ``python -m importer mcp`` twice, once opening the embedded store for each call (the default) and
once with ``--hold-store``; calls ``search`` once to warm up, then ``--calls`` times with varied queries,
and prints the median and 90th percentile of the round trip. Both in the same run, so their ratio holds on
a loaded machine where the absolute numbers do not.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

REPO = Path(__file__).resolve().parents[1]
QUERIES = (
    "why did the build fail",
    "the command that fixed the flaky test",
    "which approach did we pick and why",
    "how to configure the server",
    "error when starting the app",
)


async def round_trips(qdrant: Path, calls: int, hold_store: bool) -> list[float]:
    args = ["-m", "importer", "mcp", "--qdrant-path", str(qdrant), *(["--hold-store"] if hold_store else [])]
    server = StdioServerParameters(command=sys.executable, args=args, cwd=REPO)
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        await session.call_tool("search", {"query": "warm up"})
        seconds = []
        for i in range(calls):
            started = time.perf_counter()
            result = await session.call_tool("search", {"query": QUERIES[i % len(QUERIES)], "limit": 10})
            seconds.append(time.perf_counter() - started)
            if result.is_error:
                raise RuntimeError(result.content)
        return seconds


def summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    return f"{name}: median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms over {len(ms)} calls"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qdrant-path", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    per_call = asyncio.run(round_trips(args.qdrant_path, args.calls, hold_store=False))
    held = asyncio.run(round_trips(args.qdrant_path, args.calls, hold_store=True))
    print(summary("store opened per call (default)", per_call))
    print(summary("--hold-store", held))
    print(f"ratio per-call / held (medians): {statistics.median(per_call) / statistics.median(held):.2f}")


if __name__ == "__main__":
    main()
