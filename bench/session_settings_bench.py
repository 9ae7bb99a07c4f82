"""onnxruntime session settings against the importer's own: the embedding step alone, in one process.

Prints numbers; asserts nothing. The importer's two batch workers embed the chunk texts of a
make_corpus.py tree (the same texts as bench/importer_bench.py) with each setting in turn, round after
round, so a burst of load hits every setting alike; each round's ratio to the importer's setting is
printed, and the median of the rounds.

    .venv/bin/python bench/session_settings_bench.py --sessions 12 --seed 11 --rounds 8

Peak memory is not measured here (the settings share one process); time whole imports for that.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnxruntime as ort
from tokenizers import Encoding

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from importer_bench import chunk_texts, make_corpus  # noqa: E402

from importer.embed.local import LocalEmbedder, _run, _session, _token_budget_batches, session_options  # noqa: E402
from importer.model import default_model_dir  # noqa: E402
from importer.settings import Settings  # noqa: E402

WORKERS = 2


def tweaked_session(
    model_file: Path, *, arena: bool = True, config: dict[str, str] | None = None
) -> ort.InferenceSession:
    """The importer's session, with or without onnxruntime's memory arena, and with config entries added."""
    options = session_options()
    options.enable_cpu_mem_arena = arena
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return _session(model_file, options)


class Setting:
    """A pool of batch workers and the session each of its workers runs."""

    def __init__(self, sessions: list[ort.InferenceSession], pin: bool = False) -> None:
        self._sessions = sessions
        self._local = threading.local()
        worker_index = itertools.count()

        def start_worker() -> None:
            self._local.index = next(worker_index) % WORKERS
            if pin:  # on Linux, pid 0 is the calling thread
                os.sched_setaffinity(0, {self._local.index % (os.cpu_count() or 1)})

        self.pool = ThreadPoolExecutor(WORKERS, initializer=start_worker)

    def embed(self, encodings: list[Encoding], batches: list[list[int]]) -> float:
        """Seconds to embed every batch."""

        def run(batch: list[int]) -> None:
            _run(self._sessions[self._local.index % len(self._sessions)], [encodings[i] for i in batch])

        started = time.perf_counter()
        list(self.pool.map(run, batches))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "reflection-bench")
    args = parser.parse_args()

    root = args.work / f"corpus-realistic-{args.sessions}-{args.seed}"
    make_corpus(root, args.sessions, "realistic", args.seed)
    model_file = default_model_dir() / "model.onnx"
    # The importer's own embedder: its tokenizer, its batch budget and its session.
    embedder = LocalEmbedder(threads=WORKERS)
    encodings = embedder._tokenizer.encode_batch(chunk_texts(root, Settings()))
    tokens = sum(len(e.ids) for e in encodings)
    batches = list(_token_budget_batches([len(e.ids) for e in encodings], embedder.token_budget))
    print(f"{len(encodings)} chunks, {tokens} tokens, {len(batches)} batches, {WORKERS} workers", flush=True)

    shared = embedder._require_session()
    settings = {
        "the importer's": Setting([shared]),
        "no memory arena": Setting([tweaked_session(model_file, arena=False)]),
        "a session per worker": Setting([_session(model_file) for _ in range(WORKERS)]),
        "workers pinned to cores": Setting([shared], pin=True),
        "denormals as zero": Setting([tweaked_session(model_file, config={"session.set_denormal_as_zero": "1"})]),
    }
    for setting in settings.values():  # start the workers, warm the sessions
        setting.embed(encodings, batches[: WORKERS * 4])
    rates: dict[str, list[float]] = {name: [] for name in settings}
    for round_ in range(args.rounds):
        for name, setting in settings.items():
            rates[name].append(tokens / setting.embed(encodings, batches))
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {r[-1]:.0f}" for n, r in rates.items()), flush=True)
    ours = rates["the importer's"]
    for name, rate in rates.items():
        ratios = [mine / theirs for mine, theirs in zip(rate, ours, strict=True)]
        rounds = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        median = statistics.median(ratios)
        print(f"{name:24s} {statistics.median(rate):6.0f} tokens/s  x{median:.2f} (rounds: {rounds})")


if __name__ == "__main__":
    main()
