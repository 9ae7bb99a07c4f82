"""Importer benchmark: the whole pipeline against raw FastEmbed on the same chunk texts, and memory.

Prints numbers; asserts nothing. Both throughputs are measured in the same run on the same machine,
so their ratio holds even on a noisy machine where the absolute numbers do not.

    .venv/bin/python bench/importer_bench.py                      # 300 realistic sessions
    .venv/bin/python bench/importer_bench.py --long-sessions 2000 --long-profile heavy

1. throughput: make ``--sessions`` sessions with ../shared/corpus/make_corpus.py; chunk them with the
   importer's own parser and chunker; embed those chunk texts with fastembed directly (one thread
   calling ``TextEmbedding.embed`` with the importer's batch size: the raw speed of the model here); then
   run ``python -m importer run`` on the tree into an embedded Qdrant and compare chunks per second.
2. memory over a long run (``--long-sessions``, 0 to skip): RSS of the importer sampled every second;
   the median of the first and of the last quarter of the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
MAKE_CORPUS = Path(os.environ.get("REFLECTION_SHARED", REPO.parent / "shared")) / "corpus" / "make_corpus.py"
sys.path.insert(0, str(REPO))

from importer.chunk import Chunker  # noqa: E402
from importer.embed.local import LOCAL_MAX_CHARS  # noqa: E402
from importer.parse import ParseReport, read_messages  # noqa: E402
from importer.reader import discover  # noqa: E402
from importer.settings import Settings  # noqa: E402


def make_corpus(out: Path, sessions: int, profile: str, seed: int) -> dict[str, Any]:
    if not (out / "MANIFEST.json").exists():
        command = [sys.executable, str(MAKE_CORPUS), str(out), "--files", str(sessions), "--profile", profile]
        subprocess.run([*command, "--seed", str(seed)], check=True, capture_output=True)
    manifest: dict[str, Any] = json.loads((out / "MANIFEST.json").read_text())
    return manifest


def chunk_texts(root: Path, settings: Settings) -> list[str]:
    """The texts the importer will embed, produced by the importer's own parser and chunker."""
    texts: list[str] = []
    for rel in discover(root):
        chunker = Chunker(first_index=0, start=0, max_messages=settings.chunk_messages, max_chars=LOCAL_MAX_CHARS)
        with (root / rel).open("rb") as fh:
            messages = read_messages(
                fh, 0, ParseReport(), max_line_bytes=settings.max_line_bytes, consume_partial_tail=True
            )
            texts.extend(chunk.text for chunk in chunker.feed(messages))
        if chunker.tail is not None:
            texts.append(chunker.tail.text)
    return texts


def raw_fastembed(texts: list[str], threads: int, batch_size: int) -> dict[str, float]:
    """fastembed alone, one calling thread, texts in file order, the importer's batch size (fastembed's own
    default of 256 is slower here and takes gigabytes)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from fastembed import TextEmbedding

    from importer.model import DEFAULT_MODEL, prepare_model

    folder = prepare_model()
    model = TextEmbedding(DEFAULT_MODEL, specific_model_path=str(folder), threads=threads, local_files_only=True)
    list(model.embed(texts[:64]))  # warm up
    started = time.perf_counter()
    count = sum(1 for _ in model.embed(texts, batch_size=batch_size))
    seconds = time.perf_counter() - started
    return {"chunks": count, "seconds": seconds, "chunks_per_s": count / seconds}


class RssSampler:
    """Samples the RSS of a process (and its children) every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.samples.append(sum(p.memory_info().rss for p in tree) / 2**20)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.samples


def store_footprint_mb(qdrant: Path) -> float:
    """What the embedded store's points take in memory once opened, in a fresh process: the part of an
    embedded-mode importer's RSS that grows with the store, not with the importer's work."""
    probe = (
        "import sys, psutil; from qdrant_client import QdrantClient; process = psutil.Process(); "
        "before = process.memory_info().rss; client = QdrantClient(path=sys.argv[1]); "
        "print((process.memory_info().rss - before) / 2**20); client.close()"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(qdrant)], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[0])


def run_importer(root: Path, work: Path, qdrant_url: str | None, interval: float) -> tuple[dict[str, Any], list[float]]:
    """``python -m importer run`` into an embedded store in ``work`` (or a server), sampling its RSS."""
    target = ["--qdrant-url", qdrant_url] if qdrant_url else ["--qdrant-path", str(work / "qdrant")]
    command = [sys.executable, "-m", "importer", "run", "--source", str(root), "--json", *target]
    command += ["--state-file", str(work / "state.json")]
    # As the Jobs run it: MALLOC_ARENA_MAX=2 (the importer also applies it itself when unset).
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    sampler = RssSampler(process.pid, interval)
    out, _ = process.communicate()
    samples = sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"importer failed with exit code {process.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result, samples


def throughput(args: argparse.Namespace, base: Path) -> None:
    root = base / f"corpus-{args.profile}-{args.sessions}"
    manifest = make_corpus(root, args.sessions, args.profile, args.seed)
    settings = Settings()
    texts = chunk_texts(root, settings)
    print(f"corpus: {manifest['files']} files, {manifest['bytes'] / 2**20:.0f} MiB, {len(texts)} chunks")

    raw = raw_fastembed(texts, threads=args.threads, batch_size=settings.batch_size)
    print(f"raw fastembed:  {raw['chunks_per_s']:7.1f} chunks/s  ({raw['chunks']} chunks in {raw['seconds']:.1f} s)")

    with tempfile.TemporaryDirectory(dir=base) as work:
        result, samples = run_importer(root, Path(work), None, interval=0.5)
        store = store_footprint_mb(Path(work) / "qdrant")
    chunks_per_s = result["chunks"] / result["seconds"]
    files_per_min = result["files"] / result["seconds"] * 60
    print(
        f"importer:       {chunks_per_s:7.1f} chunks/s  ({result['chunks']} chunks, {result['files']} files "
        f"in {result['seconds']:.1f} s = {files_per_min:.0f} files/min)"
    )
    print(f"ratio importer/raw: {chunks_per_s / raw['chunks_per_s']:.2f}  (target >= 0.9)")
    print(f"peak RSS: {max(samples):.0f} MB sampled, {result['peak_rss_mb']:.0f} MB reported  (target <= 450)")
    print(
        f"  of which the embedded store's {result['chunks']} points: {store:.0f} MB; "
        f"the importer without them: {max(samples) - store:.0f} MB"
    )


def long_run(args: argparse.Namespace, base: Path) -> None:
    root = base / f"corpus-{args.long_profile}-{args.long_sessions}"
    manifest = make_corpus(root, args.long_sessions, args.long_profile, args.seed + 1)
    print(f"long run: {manifest['files']} files, {manifest['bytes'] / 2**20:.0f} MiB ({args.long_profile})")
    with tempfile.TemporaryDirectory(dir=base) as work:
        result, samples = run_importer(root, Path(work), args.qdrant_url, interval=1.0)
        store = 0.0 if args.qdrant_url else store_footprint_mb(Path(work) / "qdrant")
    quarter = max(1, len(samples) // 4)
    first, last = statistics.median(samples[:quarter]), statistics.median(samples[-quarter:])
    print(
        f"long run: {result['chunks']} chunks, {result['files']} files in {result['seconds']:.0f} s; "
        f"{len(samples)} RSS samples"
    )
    print(
        f"median RSS first quarter {first:.0f} MB, last quarter {last:.0f} MB: "
        f"{(last / first - 1) * 100:+.1f} %  (target within 10 %); peak {max(samples):.0f} MB"
    )
    if store:
        print(
            f"the embedded store holds {store:.0f} MB at the end, growing with its points: "
            f"last quarter less the store {last - store:.0f} MB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--profile", default="realistic")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=Settings().workers, help="onnxruntime threads, both sides")
    parser.add_argument("--long-sessions", type=int, default=0, help="0 skips the long run")
    parser.add_argument("--long-profile", default="heavy")
    parser.add_argument("--qdrant-url", help="long run against a Qdrant server instead of the embedded store")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "reflection-bench")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.skip_throughput:
        throughput(args, args.work)
    if args.long_sessions:
        long_run(args, args.work)


if __name__ == "__main__":
    main()
