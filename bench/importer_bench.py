"""Importer benchmark: the whole pipeline against raw FastEmbed on the same chunk texts, and memory.

Prints numbers; asserts nothing. Every throughput is measured in the same run on the same machine, and
the runs alternate (``--repeat``), so their ratios hold even on a noisy machine where the absolute
numbers do not.

    .venv/bin/python bench/importer_bench.py --sessions 80 --seed 11        # make_corpus.py realistic
    .venv/bin/python bench/importer_bench.py --baseline-python ../base/.venv/bin/python --repeat 2
    .venv/bin/python bench/importer_bench.py --long-sessions 2000 --long-profile heavy

1. throughput: make ``--sessions`` sessions with ../shared/corpus/make_corpus.py; chunk them with the
   importer's own parser and chunker; count the tokens the model embeds (the tokenizer, truncated at 256:
   the model's real work); embed those chunk texts with fastembed's ``TextEmbedding.embed`` (its default
   batching, and batch 8) on the same prepared model folder, each in a process of its own; then run
   ``python -m importer run`` on the tree into an embedded Qdrant, and, with ``--baseline-python``, the
   importer of another checkout (that interpreter's venv, its own model folder ``--baseline-model-dir``,
   prepared beforehand with that checkout's ``IMPORTER_MODEL_DIR=DIR python -m importer model prepare``)
   the same way. Per run:
   tokens/s, chunks/s, MB of logs per minute, files/min, peak RSS, and the ratios. Then the ceiling: the
   encoder's matrix work per second per worker thread in the importer's runs against onnxruntime's own
   single-threaded MatMul on the model's weight shapes (how much faster the arithmetic could go at all).
2. memory over a long run (``--long-sessions``, 0 to skip): RSS of the importer sampled every second;
   the median of the first and of the last quarter of the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def token_counts(texts: list[str]) -> list[int]:
    """Tokens the model embeds for each of ``texts``: [CLS] and [SEP] included, truncated at 256."""
    from tokenizers import Tokenizer

    from importer.model import MAX_TOKENS, prepare_model

    tokenizer = Tokenizer.from_file(str(prepare_model() / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


def model_config() -> dict[str, Any]:
    """The prepared model's ``config.json`` (its sizes)."""
    from importer.model import prepare_model

    config: dict[str, Any] = json.loads((prepare_model() / "config.json").read_text())
    return config


def model_flops(lengths: list[int]) -> float:
    """Floating-point operations the encoder needs for texts of these token counts, unpadded.

    Per layer and token: the Q, K, V and output projections (4·h²) and the feed-forward pair (2·h·i)
    multiply-adds; attention's scores and weighted sum 2·h·L more for a text of L tokens. Two operations
    per multiply-add. Layer norms, GELU and softmax are left out: this is the matrix work alone.
    """
    config = model_config()
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    per_token = 4 * hidden * hidden + 2 * hidden * inner
    return 2.0 * layers * sum(length * (per_token + 2 * hidden * length) for length in lengths)


def matmul_gflops(rows: int = 512, repeat: int = 100) -> float:
    """onnxruntime's single-threaded MatMul on the encoder's own shapes (a batch of ``rows`` tokens through
    the QKV, output and feed-forward weights): what one core can do, measured here and now."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from importer.embed.local import session_options

    config = model_config()
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    options = session_options()  # the importer's own: one thread
    flops = seconds = 0.0
    for k, n in ((hidden, 3 * hidden), (hidden, hidden), (hidden, inner), (inner, hidden)):
        weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n), np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])],
            "matmul",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
            [weight],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feed = {"x": np.ones((rows, k), np.float32)}
        session.run(None, feed)
        started = time.perf_counter()
        for _ in range(repeat):
            session.run(None, feed)
        seconds += time.perf_counter() - started
        flops += 2.0 * rows * k * n * repeat
    return flops / seconds / 1e9


def raw_fastembed_worker(texts_file: Path, threads: int, batch_size: int) -> None:
    """fastembed alone, one calling thread, texts in file order; prints its result as JSON (run as a child)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from fastembed import TextEmbedding

    from importer.model import DEFAULT_MODEL, prepare_model

    texts: list[str] = json.loads(texts_file.read_text())
    folder = prepare_model()
    model = TextEmbedding(DEFAULT_MODEL, specific_model_path=str(folder), threads=threads, local_files_only=True)
    list(model.embed(texts[:8]))  # warm up
    started = time.perf_counter()
    count = sum(1 for _ in model.embed(texts, **({"batch_size": batch_size} if batch_size else {})))
    print(json.dumps({"chunks": count, "seconds": time.perf_counter() - started}))


def raw_fastembed(texts_file: Path, threads: int, batch_size: int) -> tuple[dict[str, Any], list[float]]:
    """:func:`raw_fastembed_worker` in a process of its own, its RSS sampled (batch 0: fastembed's default)."""
    command = [sys.executable, __file__, "--raw-worker", str(texts_file), "--threads", str(threads)]
    return sampled_json([*command, "--raw-batch", str(batch_size)], cwd=REPO, env=dict(os.environ))


def sampled_json(
    command: list[str], *, cwd: Path, env: dict[str, str], interval: float = 0.5
) -> tuple[dict[str, Any], list[float]]:
    """Run ``command``, sampling its RSS; return the JSON object on its last line of output and the samples."""
    cpu_before = _children_cpu_seconds()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    sampler = RssSampler(process.pid, interval)
    out, _ = process.communicate()
    samples = sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"{command[:4]} failed with exit code {process.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["cpu_seconds"] = _children_cpu_seconds() - cpu_before
    return result, samples


def _children_cpu_seconds() -> float:
    """CPU time of the waited-for child processes so far: far less sensitive than wall time to other load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
        "import sys, psutil; from pathlib import Path; from importer.store.edge import EdgeStore; "
        "process = psutil.Process(); before = process.memory_info().rss; "
        "store = EdgeStore.open(Path(sys.argv[1]), suffix='local', for_writing=False); "
        "[store.count(name) for name in store.collections()]; "
        "print((process.memory_info().rss - before) / 2**20); store.close()"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(qdrant)], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[0])


def run_importer(
    root: Path,
    work: Path,
    qdrant_url: str | None,
    interval: float,
    python: str = sys.executable,
    checkout: Path = REPO,
    model_dir: Path | None = None,
) -> tuple[dict[str, Any], list[float]]:
    """``python -m importer run`` of ``checkout`` into an embedded store in ``work`` (or a server), sampling its RSS.

    ``model_dir`` is the prepared model folder that run uses (None: the environment's)."""
    target = ["--qdrant-url", qdrant_url] if qdrant_url else ["--qdrant-path", str(work / "qdrant")]
    command = [python, "-m", "importer", "run", "--source", str(root), "--json", *target]
    command += ["--state-file", str(work / "state.json")]
    # As the Jobs run it: MALLOC_ARENA_MAX=2 (the importer also applies it itself when unset).
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    if model_dir is not None:
        env["IMPORTER_MODEL_DIR"] = str(model_dir)
    return sampled_json(command, cwd=checkout, env=env, interval=interval)


def report(name: str, result: dict[str, Any], tokens: int, logs_mb: float, files: int, rss: float) -> dict[str, float]:
    seconds = result["seconds"]
    row = {
        "tokens_per_s": tokens / seconds,
        "chunks_per_s": result["chunks"] / seconds,
        "mb_per_min": logs_mb / seconds * 60,
        "files_per_min": files / seconds * 60,
        "tokens_per_cpu_s": tokens / result["cpu_seconds"],
        "peak_rss_mb": rss,
    }
    print(
        f"{name:24s} {seconds:6.1f} s {row['tokens_per_s']:6.0f} tokens/s {row['chunks_per_s']:6.2f} chunks/s "
        f"{row['mb_per_min']:6.2f} MB/min {row['files_per_min']:5.1f} files/min | "
        f"{row['tokens_per_cpu_s']:5.0f} tokens per CPU-s (whole process) | peak RSS {rss:4.0f} MB",
        flush=True,
    )
    return row


def throughput(args: argparse.Namespace, base: Path) -> None:
    root = base / f"corpus-{args.profile}-{args.sessions}-{args.seed}"
    manifest = make_corpus(root, args.sessions, args.profile, args.seed)
    settings = Settings()
    texts = chunk_texts(root, settings)
    lengths = token_counts(texts)
    tokens, flops = sum(lengths), model_flops(lengths)
    logs_mb = manifest["bytes"] / 2**20
    files = len(discover(root))
    print(f"corpus: {files} files, {logs_mb:.1f} MiB, {len(texts)} chunks, {tokens} tokens embedded")
    texts_file = base / f"texts-{os.getpid()}.json"
    texts_file.write_text(json.dumps(texts))
    contenders: dict[str, Any] = {
        "raw fastembed (default)": lambda: raw_fastembed(texts_file, args.threads, 0),
        "raw fastembed (batch 8)": lambda: raw_fastembed(texts_file, args.threads, 8),
        "importer": lambda: importer_run(root, base),
    }
    if args.baseline_python:
        checkout = Path(args.baseline_python).absolute().parents[2]
        model_dir = args.baseline_model_dir

        def baseline() -> tuple[dict[str, Any], list[float]]:
            return importer_run(root, base, args.baseline_python, checkout, model_dir)

        contenders["baseline importer"] = baseline
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    try:
        for _ in range(args.repeat):  # alternate, so that a burst of load hits every contender alike
            for name, measure in contenders.items():
                result, samples = measure()
                if result["chunks"] != len(texts):
                    print(f"  note: {name} embedded {result['chunks']} chunks, the chunker made {len(texts)}")
                rows[name].append(report(name, result, tokens, logs_mb, files, max(samples)))
    finally:
        texts_file.unlink()
    print_ratios(rows)
    print_ceiling(rows["importer"], tokens, flops, settings.workers)


def importer_run(
    root: Path, base: Path, python: str = sys.executable, checkout: Path = REPO, model_dir: Path | None = None
) -> tuple[dict[str, Any], list[float]]:
    with tempfile.TemporaryDirectory(dir=base) as work:
        return run_importer(root, Path(work), None, 0.5, python, checkout, model_dir)


def print_ratios(rows: dict[str, list[dict[str, float]]]) -> None:
    """The importer's ratios to each other contender, per round (runs next to each other see similar load),
    and their median over the rounds."""
    ours = rows["importer"]
    for name, runs in rows.items():
        if name == "importer":
            continue
        for key, label in (
            ("tokens_per_s", "tokens/s"),
            ("mb_per_min", "MB of logs/min"),
            ("tokens_per_cpu_s", "tokens per CPU-s"),
        ):
            ratios = [mine[key] / other[key] for mine, other in zip(ours, runs, strict=True)]
            rounds = ", ".join(f"{ratio:.2f}" for ratio in ratios)
            print(f"importer / {name}: {label} x{statistics.median(ratios):.2f} (rounds: {rounds})")
        rss = statistics.median(
            mine["peak_rss_mb"] / other["peak_rss_mb"] for mine, other in zip(ours, runs, strict=True)
        )
        print(f"importer / {name}: peak RSS x{rss:.2f}")
    print("targets: tokens/s >= 1.3x raw fastembed; MB of logs/min >= 1.5x the baseline importer")


def print_ceiling(runs: list[dict[str, float]], tokens: int, flops: float, workers: int) -> None:
    """How close the importer's embedding runs to what the cores can do at all: the encoder's matrix work per
    second per worker thread against onnxruntime's own single-threaded MatMul on the same shapes, measured
    right after (nothing else of the bench running)."""
    achieved = [flops / (tokens / run["tokens_per_s"]) / workers / 1e9 for run in runs]
    ceiling = matmul_gflops()
    rounds = ", ".join(f"{gflops:.0f}" for gflops in achieved)
    print(
        f"importer: {statistics.median(achieved):.0f} GFLOPS of matrix work per worker thread (rounds: {rounds}); "
        f"onnxruntime MatMul alone on one core: {ceiling:.0f} GFLOPS "
        f"(x{statistics.median(achieved) / ceiling:.2f}; {flops / tokens / 1e6:.1f} MFLOP per token)"
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
    parser.add_argument("--repeat", type=int, default=1, help="alternating rounds of every contender")
    parser.add_argument("--baseline-python", help="also run the importer of the checkout whose venv has this python")
    parser.add_argument(
        "--baseline-model-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "base-model",
        help="the baseline's own prepared model folder (an older checkout may expect an older model format: "
        "it must not use, nor rewrite, this checkout's; prepare it with that checkout's `model prepare`)",
    )
    parser.add_argument("--raw-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--raw-batch", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_worker:
        raw_fastembed_worker(args.raw_worker, args.threads, args.raw_batch)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.skip_throughput:
        throughput(args, args.work)
    if args.long_sessions:
        long_run(args, args.work)


if __name__ == "__main__":
    main()
