"""Retrieval benchmark: how often search finds the session, and the moment, a labelled query is after.

    .venv/bin/python bench/retrieval_bench.py              # ../shared/corpus/real-eval: before, dense, hybrid
    .venv/bin/python bench/retrieval_bench.py CORPUS --configs dense,hybrid,1-message --json

For each configuration: import the corpus's sessions with the real importer (``python -m importer run``;
for ``before``, the importer of the ``--baseline`` commit, default main) into a temporary embedded store
(configurations with the same importer and options share one import), run every query of ``queries.jsonl``
through the project's search (:class:`importer.search.Searcher`, the model kept loaded as the MCP server
keeps it), and score the top 10:

- session@1 and MRR@10: the first hit from a relevant session; a session is relevant when one of its
  user/assistant messages holds ``target_text`` (normally just ``session_file``; a resumed session that
  repeats it too); a sub-agent's file counts as its parent session;
- moment@5 and moment@10: a hit whose whitespace-normalised text holds the 40 middle characters of the
  whitespace-normalised ``target_text``.

Overall and per query kind, every configuration in the same run. To compare new settings, add a
:class:`Configuration` (its ``importer run`` options and, if the search differs, its search function).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = Path(os.environ.get("REFLECTION_SHARED", REPO.parent / "shared")) / "corpus" / "real-eval"
sys.path.insert(0, str(REPO))

from importer.parse import ParseReport, read_messages  # noqa: E402
from importer.search import Hit, Searcher, session_of  # noqa: E402
from importer.settings import Settings  # noqa: E402

DEPTH = 10
MOMENT_CHARS = 40
Search = Callable[[Searcher, str, int], Awaitable[list[Hit]]]


async def dense_search(searcher: Searcher, query: str, limit: int) -> list[Hit]:
    return await searcher.search(query, limit=limit, lexical=False)


async def hybrid_search(searcher: Searcher, query: str, limit: int) -> list[Hit]:
    return await searcher.search(query, limit=limit)


@dataclass(frozen=True)
class Configuration:
    name: str
    description: str
    #: Extra options of ``python -m importer run``.
    import_options: tuple[str, ...] = ()
    search: Search = hybrid_search
    #: Imported by the importer of ``--baseline`` (a commit of this repository), not this checkout's.
    baseline: bool = False


#: The default run compares the first three; name others with --configs. Configurations with the same import
#: options share one import.
CONFIGURATIONS = (
    Configuration("before", "the --baseline importer and dense search", search=dense_search, baseline=True),
    Configuration("dense", "this importer, dense search", search=dense_search),
    Configuration("hybrid", "up to 5 messages per chunk, dense + BM25 fused by RRF (the default)"),
    Configuration("1-message", "one message per chunk, hybrid", ("--chunk-messages", "1")),
    Configuration("2-messages", "up to 2 messages per chunk, hybrid", ("--chunk-messages", "2")),
)


@dataclass
class Query:
    id: str
    query: str
    session_file: str
    target_text: str
    kind: str
    relevant: set[str] = field(default_factory=set)

    @property
    def moment(self) -> str:
        """The 40 middle characters of the normalised target: what a hit's text must hold."""
        target = normalise(self.target_text)
        middle = max(0, (len(target) - MOMENT_CHARS) // 2)
        return target[middle : middle + MOMENT_CHARS]


@dataclass
class Outcome:
    kind: str
    session_rank: int | None  # 1-based rank of the first hit from a relevant session, within DEPTH
    moment_rank: int | None  # 1-based rank of the first hit holding the moment, within DEPTH


def normalise(text: str) -> str:
    return " ".join(text.split())


def load_queries(corpus: Path) -> list[Query]:
    lines = (corpus / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    return [Query(**json.loads(line)) for line in lines if line.strip()]


def session_files(corpus: Path) -> list[str]:
    return sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.jsonl") if p.name != "queries.jsonl")


def mark_relevant(corpus: Path, queries: list[Query]) -> None:
    """Every session (parents for sub-agents) with a message holding a query's target, read by the importer's
    own parser: what a search could find."""
    for rel in session_files(corpus):
        with (corpus / rel).open("rb") as fh:
            texts = [
                m.text for m in read_messages(fh, 0, ParseReport(), max_line_bytes=8 << 20, consume_partial_tail=True)
            ]
        for query in queries:
            if any(query.target_text in text for text in texts):
                query.relevant.add(session_of(rel))
    for query in queries:
        query.relevant.add(query.session_file)


def link_sessions(corpus: Path, tree: Path) -> None:
    """The session files alone, as a ~/.claude/projects tree (queries.jsonl is not a session)."""
    for rel in session_files(corpus):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).symlink_to(corpus / rel)


def checkout(commit: str, folder: Path) -> Path:
    """The files of ``commit`` in ``folder`` (once): its importer runs from there with this venv."""
    if not folder.exists():
        folder.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def run_import(tree: Path, work: Path, config: Configuration, source: Path = REPO) -> dict[str, Any]:
    command = [sys.executable, "-m", "importer", "run", "--source", str(tree), "--qdrant-path", str(work / "q")]
    command += ["--state-file", str(work / "state.json"), "--json", "--no-progress", *config.import_options]
    done = subprocess.run(command, cwd=source, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"import failed ({done.returncode}): {done.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def score(query: Query, hits: list[Hit]) -> Outcome:
    session_rank = next((i for i, h in enumerate(hits, 1) if h.session in query.relevant), None)
    moment_rank = next((i for i, h in enumerate(hits, 1) if query.moment in normalise(h.text)), None)
    return Outcome(query.kind, session_rank, moment_rank)


def metrics(outcomes: list[Outcome]) -> dict[str, float]:
    n = len(outcomes)
    return {
        "queries": n,
        "session@1": sum(o.session_rank == 1 for o in outcomes) / n,
        "MRR@10": sum(1 / o.session_rank for o in outcomes if o.session_rank) / n,
        "moment@5": sum(o.moment_rank is not None and o.moment_rank <= 5 for o in outcomes) / n,
        "moment@10": sum(o.moment_rank is not None for o in outcomes) / n,
    }


async def evaluate(
    settings: Settings, config: Configuration, queries: list[Query]
) -> tuple[list[Outcome], list[float]]:
    searcher = await Searcher.open(settings)
    try:
        await config.search(searcher, "warm up", DEPTH)
        outcomes, seconds = [], []
        for query in queries:
            started = time.perf_counter()
            hits = await config.search(searcher, query.query, DEPTH)
            seconds.append(time.perf_counter() - started)
            outcomes.append(score(query, hits))
        return outcomes, seconds
    finally:
        await searcher.aclose()


def measure(corpus: Path, config: Configuration, queries: list[Query], work: Path, baseline: str) -> dict[str, Any]:
    tree = work / "sessions"
    if not tree.exists():
        link_sessions(corpus, tree)
    store = work / ("import-" + (baseline if config.baseline else "this") + "".join(config.import_options))
    if not (store / "summary.json").exists():
        source = checkout(baseline, work / f"checkout-{baseline}") if config.baseline else REPO
        store.mkdir()
        (store / "summary.json").write_text(json.dumps(run_import(tree, store, config, source)))
    summary = json.loads((store / "summary.json").read_text())
    settings = Settings(qdrant_path=store / "q")
    outcomes, seconds = asyncio.run(evaluate(settings, config, queries))
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_kind[outcome.kind].append(outcome)
    return {
        "configuration": config.name,
        "description": config.description,
        "chunks": summary["chunks"],
        "import_seconds": summary["seconds"],
        "search_ms_median": round(statistics.median(seconds) * 1000, 1),
        "overall": metrics(outcomes),
        "kinds": {kind: metrics(found) for kind, found in sorted(by_kind.items())},
        "misses": {
            "moment@10": [q.id for q, o in zip(queries, outcomes, strict=True) if o.moment_rank is None],
            # The right session first but not the right part of it: a question for the units, not the ranking.
            "moment@10, session first": [
                q.id for q, o in zip(queries, outcomes, strict=True) if o.moment_rank is None and o.session_rank == 1
            ],
        },
    }


def table(results: list[dict[str, Any]]) -> str:
    columns = ("session@1", "MRR@10", "moment@5", "moment@10")
    lines = [f"| configuration | scope | n | {' | '.join(columns)} |", "|---" * (len(columns) + 3) + "|"]
    for result in results:
        scopes = {"all": result["overall"], **result["kinds"]}
        for scope, values in scopes.items():
            cells = " | ".join(f"{values[c]:.2f}" for c in columns)
            lines.append(f"| {result['configuration']} | {scope} | {values['queries']} | {cells} |")
    for result in results:
        lines.append(
            f"\n{result['configuration']}: {result['description']}; {result['chunks']} chunks imported in "
            f"{result['import_seconds']:.0f} s; search median {result['search_ms_median']} ms (in-process, warm); "
            f"moment@10 misses: {', '.join(result['misses']['moment@10']) or 'none'} (of which the right session "
            f"was first: {', '.join(result['misses']['moment@10, session first']) or 'none'})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, nargs="?", default=DEFAULT_CORPUS, help=f"default {DEFAULT_CORPUS}")
    names = [c.name for c in CONFIGURATIONS]
    parser.add_argument("--configs", default=",".join(names[:3]), help=f"comma-separated, of {names}")
    parser.add_argument("--baseline", default="main", help="the commit whose importer 'before' uses (default main)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--work", type=Path, help="keep the imports here, reuse them next time")
    args = parser.parse_args()
    chosen = [c for c in CONFIGURATIONS if c.name in args.configs.split(",")]
    queries = load_queries(args.corpus)
    mark_relevant(args.corpus, queries)
    with tempfile.TemporaryDirectory(prefix="retrieval-bench-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        results = [measure(args.corpus.resolve(), config, queries, work, args.baseline) for config in chosen]
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
