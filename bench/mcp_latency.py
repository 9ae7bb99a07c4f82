"""How long a warm ``search`` takes through the MCP server, as Claude Code calls it (stdio, the SDK's client).

    .venv/bin/python bench/mcp_latency.py --qdrant-path STORE [--calls 30]

Starts ``python -m importer mcp`` three times: at its defaults with calls in quick succession (the store
stays open between them: it is released after 3 idle seconds), with ``--release-store-after 0`` (the store
opened for every call, as a call after an idle pause finds it), and with ``--hold-store``. Each calls
``search`` once to warm up, then ``--calls`` times with varied queries, and prints the median and 90th
percentile of the round trip. All in the same run, so their ratios hold on a loaded machine where the
absolute numbers do not.
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


MODES = {
    "defaults, calls in quick succession": [],
    "store opened per call (--release-store-after 0)": ["--release-store-after", "0"],
    "--hold-store": ["--hold-store"],
}


async def round_trips(qdrant: Path, calls: int, options: list[str]) -> list[float]:
    args = ["-m", "importer", "mcp", "--qdrant-path", str(qdrant), *options]
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
    medians = {}
    for name, options in MODES.items():
        seconds = asyncio.run(round_trips(args.qdrant_path, args.calls, options))
        medians[name] = statistics.median(seconds)
        print(summary(name, seconds))
    held = medians["--hold-store"]
    print("ratio to --hold-store (medians): " + ", ".join(f"{name} {m / held:.2f}" for name, m in medians.items()))


if __name__ == "__main__":
    main()
