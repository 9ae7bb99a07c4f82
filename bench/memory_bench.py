"""Memory benchmark of the importer with the embedded store (Qdrant Edge). Prints numbers; asserts nothing.

1. ``--sessions`` (300) ``realistic`` sessions at the defaults: peak RSS (target <= 350 MB) and throughput.
2. A long run over ``--long-sessions`` (2000) sessions, stopped (SIGTERM: it saves and exits) after
   ``--long-minutes`` (30); RSS sampled every second, the median of the first and the last quarter
   (target: the last within 10 % of the first); prints how many files it got through.
3. The same 300 sessions inside a 512 MiB cgroup v1 memory limit that this bench makes under
   ``/sys/fs/cgroup/memory/<name>/`` (needs root): completes without an OOM kill? The importer reads the
   limit from its own cgroup (``/proc/self/cgroup``) and budgets 80 % of it.

    .venv/bin/python bench/memory_bench.py
    .venv/bin/python bench/memory_bench.py --long-sessions 0            # skip the long run
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from importer_bench import REPO, RssSampler, make_corpus

CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def importer_command(root: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "importer", "run", "--source", str(root), "--json",
            "--qdrant-path", str(work / "qdrant"), "--state-file", str(work / "state.json")]  # fmt: skip


def run(command: list[str], *, minutes: float | None = None) -> tuple[int, dict[str, Any] | None, list[float]]:
    """Run the importer, sampling its RSS every second; SIGTERM it after ``minutes``."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = RssSampler(process.pid, interval=1.0)
    try:
        out, _ = process.communicate(timeout=minutes * 60 if minutes else None)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate()
    samples = sampler.stop()
    lines = out.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return process.returncode, summary, samples


def at_defaults(root: Path, base: Path) -> None:
    with tempfile.TemporaryDirectory(dir=base) as work:
        code, summary, samples = run(importer_command(root, Path(work)))
    assert summary is not None, f"importer exit code {code}"
    print(
        f"300 sessions at the defaults: exit {code}, {summary['chunks']} chunks in {summary['seconds']:.0f} s "
        f"= {summary['chunks'] / summary['seconds']:.1f} chunks/s; peak RSS {max(samples):.0f} MB sampled, "
        f"{summary['peak_rss_mb']:.0f} MB reported (target <= 350)",
        flush=True,
    )


def long_run(args: argparse.Namespace, base: Path) -> None:
    root = base / f"corpus-realistic-{args.long_sessions}"
    manifest = make_corpus(root, args.long_sessions, "realistic", args.seed + 1)
    with tempfile.TemporaryDirectory(dir=base) as work:
        code, summary, samples = run(importer_command(root, Path(work)), minutes=args.long_minutes)
    quarter = max(1, len(samples) // 4)
    first, last = statistics.median(samples[:quarter]), statistics.median(samples[-quarter:])
    done = summary["files"] if summary else "?"
    print(
        f"long run: {done} of {manifest['files']} files in {len(samples)} s (exit {code}); median RSS first quarter "
        f"{first:.0f} MB, last quarter {last:.0f} MB: {(last / first - 1) * 100:+.1f} % (target within 10 %); "
        f"peak {max(samples):.0f} MB",
        flush=True,
    )


def in_cgroup(root: Path, base: Path, limit: int) -> None:
    if not os.access(CGROUP_V1, os.W_OK):
        print(f"cgroup run skipped: {CGROUP_V1} is not writable here (cgroup v1 and root needed)")
        return
    group = CGROUP_V1 / f"reflection-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        with tempfile.TemporaryDirectory(dir=base) as work:
            # The shell joins the group, then becomes the importer: every byte it allocates is limited.
            joined = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
            code, summary, samples = run([*joined, *importer_command(root, Path(work))])
        oom_kills = _oom_kills(group)
        peak = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        chunks = summary["chunks"] if summary else "?"
        print(
            f"in a {limit >> 20} MiB cgroup v1: exit {code} ({'completed' if code == 0 else 'did not complete'}), "
            f"{chunks} chunks, OOM kills {oom_kills}, cgroup peak usage {peak:.0f} MiB (page cache included), "
            f"importer peak RSS {max(samples):.0f} MB",
            flush=True,
        )
    finally:
        while _pids(group):
            time.sleep(0.1)
        group.rmdir()


def _oom_kills(group: Path) -> int | str:
    for line in (group / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return "not reported by this kernel; failcnt " + (group / "memory.failcnt").read_text().strip()


def _pids(group: Path) -> list[str]:
    return (group / "cgroup.procs").read_text().split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--long-sessions", type=int, default=2000, help="0 skips the long run")
    parser.add_argument("--long-minutes", type=float, default=30.0)
    parser.add_argument("--cgroup-mib", type=int, default=512, help="0 skips the cgroup run")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "reflection-bench")
    parser.add_argument("--skip-defaults", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    root = args.work / f"corpus-realistic-{args.sessions}"
    manifest = make_corpus(root, args.sessions, "realistic", args.seed)
    print(f"corpus: {manifest['files']} files, {manifest['bytes'] / 2**20:.0f} MiB", flush=True)
    if not args.skip_defaults:
        at_defaults(root, args.work)
    if args.cgroup_mib:
        in_cgroup(root, args.work, args.cgroup_mib << 20)
    if args.long_sessions:
        long_run(args, args.work)


if __name__ == "__main__":
    main()
