"""Every setting of a run, from the command line or, for Jobs, from an environment variable.

One table lists them all: the option, the variable, the type, the default and the help text, so the
command line, the environment and the README cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from importer.contract import DEFAULT_BATCH_SIZE, ImporterEnv


@dataclass
class Settings:
    source: Path | None = None
    qdrant_url: str | None = None
    qdrant_path: Path | None = None
    qdrant_api_key: str | None = None
    provider: str = "fastembed"
    model: str | None = None
    model_dir: Path | None = None
    voyage_base_url: str | None = None
    state_file: Path | None = None
    state_configmap: str | None = None
    namespace: str | None = None
    run_name: str = ""
    run_id: str = ""
    shard_index: int = 0
    shard_count: int = 1
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = 2
    chunk_messages: int = 5
    max_chunk_chars: int | None = None
    max_line_bytes: int = 8 << 20
    settle_seconds: float = 300.0
    checkpoint_seconds: float = 5.0
    memory_limit: int | None = None
    memory_fraction: float = 0.8
    upsert_attempts: int = 6
    prune_deleted: bool = False
    #: Within the Pod's default 30 s grace period, with time left to save and exit.
    stop_seconds: float = 10.0
    #: Measured (README "Benchmarks", store): brute force answers in ~3 ms at 20,000 points, where building the
    #: index took minutes and did not make queries faster; ~100 ms at 100,000. So only past 100,000 (a choice).
    index_min_points: int = 100_000
    json: bool = False
    progress: bool | None = None

    def validate(self) -> None:
        if self.source is None:
            raise SettingsError("--source (IMPORTER_SOURCE) is required")
        if not self.source.is_dir():
            raise SettingsError(f"--source {self.source}: not a directory")
        if (self.qdrant_url is None) == (self.qdrant_path is None):
            raise SettingsError("give exactly one of --qdrant-url or --qdrant-path (IMPORTER_QDRANT_URL/_PATH)")
        if self.provider not in ("fastembed", "voyage"):
            raise SettingsError(f"--provider {self.provider!r}: must be fastembed or voyage")
        if not 0 <= self.shard_index < self.shard_count:
            raise SettingsError(f"--shard-index {self.shard_index} must be in [0, --shard-count {self.shard_count})")
        if self.state_configmap and not self.namespace:
            raise SettingsError("--state-configmap needs --namespace (IMPORTER_NAMESPACE)")
        if not 0 < self.memory_fraction <= 1:
            raise SettingsError("--memory-fraction must be in (0, 1]")
        if self.stop_seconds < 0:
            raise SettingsError("--stop-seconds must not be negative")
        for name in ("batch_size", "workers", "chunk_messages"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it."""


def _flag(raw: str) -> bool:
    """A yes/no setting from the environment: 1/true/yes/on or 0/false/no/off."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


# option, type, help. The environment variable is IMPORTER_<NAME> (API keys also from their usual names).
_OPTIONS: dict[str, tuple[Any, str]] = {
    "source": (Path, "root of the conversation tree (shaped like ~/.claude/projects)"),
    "qdrant_url": (str, "Qdrant server URL, e.g. http://localhost:6333"),
    "qdrant_path": (Path, "folder of an embedded Qdrant store (instead of a server)"),
    "qdrant_api_key": (str, "Qdrant API key (also QDRANT_API_KEY)"),
    "provider": (str, "embedding provider: fastembed (local) or voyage"),
    "model": (str, "embedding model (default per provider)"),
    "model_dir": (Path, "folder of the prepared FastEmbed model"),
    "voyage_base_url": (str, "Voyage AI endpoint (for a proxy or a test server)"),
    "state_file": (Path, "state in a local JSON file (laptop runs; reads the older importer's files too)"),
    "state_configmap": (str, "state in ConfigMaps named <this>-0, <this>-1, ... (Jobs)"),
    "namespace": (str, "namespace of the state ConfigMaps"),
    "run_name": (str, "the ImportRun this run belongs to (labels on the state ConfigMaps)"),
    "run_id": (str, "the run this process is an attempt of: work stamped with it counts as this run's, not unchanged"),
    "shard_index": (int, "this shard's index: files are split by a stable hash of their path"),
    "shard_count": (int, "number of shards"),
    "batch_size": (int, "an embedding batch's budget of padded tokens, in 256-token texts (small keeps memory flat)"),
    "workers": (int, "embedding threads"),
    "chunk_messages": (int, "messages per chunk at most"),
    "max_chunk_chars": (int, "characters per chunk at most (default: what the model reads)"),
    "max_line_bytes": (int, "longer JSONL lines are skipped without being read whole"),
    "settle_seconds": (float, "a last line without newline is final once the file is this quiet"),
    "checkpoint_seconds": (float, "save state at most this often (and at the end)"),
    "memory_limit": (int, "memory limit in bytes (default: the cgroup's)"),
    "memory_fraction": (float, "operational memory budget as a fraction of the limit"),
    "upsert_attempts": (int, "attempts per Qdrant write before the run fails"),
    "prune_deleted": (_flag, "delete the points and state of session files gone from the tree (default: keep them)"),
    "stop_seconds": (float, "after SIGTERM/SIGINT, seconds the work in flight may take before it is abandoned"),
    "index_min_points": (
        int,
        "embedded store: build the search index after a run that left this many points unindexed (0: never)",
    ),
}
_ALIASES = {"qdrant_api_key": ImporterEnv.QDRANT_API_KEY_ALIAS.value}


def env_name(name: str) -> str:
    return ImporterEnv.of(name).value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    for name, (kind, help_text) in _OPTIONS.items():
        default = getattr(defaults, name)
        shown = "" if default is None else f", default {default}"
        option = "--" + name.replace("_", "-")
        help_text = f"{help_text} [{env_name(name)}{shown}]"
        if kind is _flag:
            parser.add_argument(option, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(option, dest=name, type=kind, default=None, help=help_text)
    parser.add_argument("--json", action="store_true", help="print the final summary as one JSON line")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when standard error is a terminal)",
    )


def from_arguments(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Command-line values win over environment variables, which win over the defaults."""
    environ = dict(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    types = {f.name: _OPTIONS[f.name][0] for f in fields(Settings) if f.name in _OPTIONS}
    for name, kind in types.items():
        given = getattr(args, name, None)
        if given is None:
            raw = environ.get(env_name(name)) or environ.get(_ALIASES.get(name, ""))
            if raw:
                try:
                    given = kind(raw)
                except ValueError as error:
                    raise SettingsError(f"{env_name(name)}={raw!r}: {error}") from error
        if given is not None:
            values[name] = given
    values["json"] = bool(getattr(args, "json", False))
    values["progress"] = getattr(args, "progress", None)
    return Settings(**values)
