"""What the importer and the operator agree on, in one place: both import it and neither redefines it.

* the summary each importer shard publishes (``data.summary`` of the first state ConfigMap, or the state
  file's ``summary``) and the operator reads: this run's numbers and the totals of the shard's files;
* the labels and annotations on what either side creates;
* the importer's exit codes, which the operator acts on;
* the environment variables through which the operator configures the importer in a Job;
* the importer's default batch budget, which the operator's ImportRun default passes on unchanged.

Only the standard library and pydantic are imported here: the operator loads this module too.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt

# -- labels and annotations ---------------------------------------------------------------------------

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "reflection-operator"
#: The ImportRun a Job, Pod or state ConfigMap belongs to.
LABEL_IMPORTRUN = "reflection.dev/importrun"
LABEL_RUN_ID = "reflection.dev/run-id"
LABEL_ATTEMPT = "reflection.dev/attempt"
LABEL_SHARD = "reflection.dev/shard"
#: Index of a state ConfigMap among ``<base>-0``, ``<base>-1``, ...
LABEL_STATE_BUCKET = "reflection.dev/state-bucket"
#: On ``<base>-0``: how many state ConfigMaps there are.
ANNOTATION_STATE_BUCKETS = "reflection.dev/state-buckets"
#: Key of the per-shard summaries in ``<base>-0``'s data: ``{"shard-<i>": ShardSummary}``.
SUMMARY_KEY = "summary"


def summary_key(shard_index: int) -> str:
    """The key of one shard's entry in the summary map."""
    return f"shard-{shard_index}"


def shard_of_summary_key(key: str) -> int | None:
    """The shard index a summary key names, or None when it names none."""
    index = key.removeprefix("shard-")
    return int(index) if key.startswith("shard-") and index.isdigit() else None


# -- exit codes ---------------------------------------------------------------------------------------


class ExitCode(IntEnum):
    OK = 0
    #: Settings refused, or Qdrant, the model or the Kubernetes API failed after retries.
    FATAL = 1
    #: The run completed, but some files could not be read (each named in a warning and saved as failed).
    FILES_FAILED = 3
    #: The importer's RSS stayed over its operational budget: state is saved; retry with more memory.
    MEMORY_BUDGET = 86
    #: Stopped by SIGTERM/SIGINT after finishing and saving what was in flight.
    INTERRUPTED = 143


# -- defaults --------------------------------------------------------------------------------------------

#: An embedding batch's budget of padded tokens, in 256-token texts (``--batch-size``, the ImportRun's
#: ``tuning.batchSize``). Why 2: importer.embed.local, where it is measured.
DEFAULT_BATCH_SIZE = 2

# -- environment ---------------------------------------------------------------------------------------


class ImporterEnv(StrEnum):
    """Every environment variable the importer reads: ``IMPORTER_<SETTING>``, plus the API keys' usual names."""

    SOURCE = "IMPORTER_SOURCE"
    QDRANT_URL = "IMPORTER_QDRANT_URL"
    QDRANT_PATH = "IMPORTER_QDRANT_PATH"
    QDRANT_API_KEY = "IMPORTER_QDRANT_API_KEY"
    PROVIDER = "IMPORTER_PROVIDER"
    MODEL = "IMPORTER_MODEL"
    MODEL_DIR = "IMPORTER_MODEL_DIR"
    VOYAGE_BASE_URL = "IMPORTER_VOYAGE_BASE_URL"
    STATE_FILE = "IMPORTER_STATE_FILE"
    STATE_CONFIGMAP = "IMPORTER_STATE_CONFIGMAP"
    NAMESPACE = "IMPORTER_NAMESPACE"
    RUN_NAME = "IMPORTER_RUN_NAME"
    #: The run this process is an attempt of: the same on every attempt of one run (the operator's run id).
    RUN_ID = "IMPORTER_RUN_ID"
    SHARD_INDEX = "IMPORTER_SHARD_INDEX"
    SHARD_COUNT = "IMPORTER_SHARD_COUNT"
    BATCH_SIZE = "IMPORTER_BATCH_SIZE"
    WORKERS = "IMPORTER_WORKERS"
    CHUNK_MESSAGES = "IMPORTER_CHUNK_MESSAGES"
    MAX_CHUNK_CHARS = "IMPORTER_MAX_CHUNK_CHARS"
    MAX_LINE_BYTES = "IMPORTER_MAX_LINE_BYTES"
    SETTLE_SECONDS = "IMPORTER_SETTLE_SECONDS"
    CHECKPOINT_SECONDS = "IMPORTER_CHECKPOINT_SECONDS"
    MEMORY_LIMIT = "IMPORTER_MEMORY_LIMIT"
    MEMORY_FRACTION = "IMPORTER_MEMORY_FRACTION"
    UPSERT_ATTEMPTS = "IMPORTER_UPSERT_ATTEMPTS"
    PRUNE_DELETED = "IMPORTER_PRUNE_DELETED"
    STOP_SECONDS = "IMPORTER_STOP_SECONDS"
    INDEX_MIN_POINTS = "IMPORTER_INDEX_MIN_POINTS"
    #: Also read under their providers' usual names.
    QDRANT_API_KEY_ALIAS = "QDRANT_API_KEY"
    VOYAGE_API_KEY = "VOYAGE_API_KEY"

    @classmethod
    def of(cls, setting: str) -> ImporterEnv:
        """The variable of one setting (``shard_index`` → ``IMPORTER_SHARD_INDEX``)."""
        return cls[setting.upper()]


# -- the summary ---------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    # A newer importer may publish more; an older operator reads what it knows.
    model_config = ConfigDict(extra="ignore", frozen=True)


class RunNumbers(_Lenient):
    """What one run of an importer shard did, over all its attempts (retries after an OOM kill or an error):
    the numbers a person asks about after a run."""

    #: Files read (new or grown), files whose state was still current, files that failed.
    files_read: NonNegativeInt = 0
    files_unchanged: NonNegativeInt = 0
    files_failed: NonNegativeInt = 0
    messages: NonNegativeInt = 0
    #: Chunks (points) written to Qdrant.
    chunks: NonNegativeInt = 0
    #: Lines skipped, by reason (bad_json, non_utf8, too_long, ...).
    skipped: dict[str, NonNegativeInt] = Field(default_factory=dict)
    seconds: NonNegativeFloat = 0.0

    @property
    def files_processed(self) -> int:
        return self.files_read + self.files_unchanged + self.files_failed

    def __add__(self, other: RunNumbers) -> RunNumbers:
        skipped = dict(self.skipped)
        for reason, count in other.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        return RunNumbers(
            files_read=self.files_read + other.files_read,
            files_unchanged=self.files_unchanged + other.files_unchanged,
            files_failed=self.files_failed + other.files_failed,
            messages=self.messages + other.messages,
            chunks=self.chunks + other.chunks,
            skipped=dict(sorted(skipped.items())),
            # Shards run side by side: the run took as long as its slowest shard.
            seconds=max(self.seconds, other.seconds),
        )


class ShardSummary(_Lenient):
    """One importer shard's summary. The top-level numbers are totals over the shard's files as stored
    (every run so far); ``run`` holds what the current (or last) process of the shard did."""

    #: The files of this shard, and how many are done (imported up to their end) or failed.
    files_total: NonNegativeInt = 0
    files_done: NonNegativeInt = 0
    files_failed: NonNegativeInt = 0
    #: Chunks (points) written for these files, over all runs.
    chunks: NonNegativeInt = 0
    #: Bytes of these files consumed.
    bytes: NonNegativeInt = 0
    #: Pending, Running, Succeeded, Failed, MemoryBudget or Interrupted.
    phase: str = "Pending"
    updated_at: str = ""
    #: The run whose numbers ``run`` holds ("" outside the operator): a retry of the same run goes on from them.
    run_id: str = ""
    run: RunNumbers = Field(default_factory=RunNumbers)

    def to_json(self) -> dict[str, object]:
        return self.model_dump(mode="json")
