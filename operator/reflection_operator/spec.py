"""An ImportRun's spec as a typed object, with the checks the CRD schema cannot make.

The schema already refuses wrong types, enums, ranges and malformed quantities, and fills in defaults.
What remains is checked here: cron expressions, time zones, combinations of fields, memory limits against
what the importer needs. Every problem names its field so that the Ready condition can say what to fix.
Defaults are applied here too, so that a spec read without the schema (unit tests) means the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .quantity import QuantityError, format_memory, parse_quantity_bytes, parse_quantity_decimal
from .schedule import CronSchedule, ScheduleError, parse_zone
from .settings import Settings

PROVIDERS = ("fastembed", "voyage")
#: core/v1 VolumeSource's fields. The API server turns a volume without a known one into an emptyDir, so a
#: misspelt source would silently import nothing: it is refused here instead.
VOLUME_SOURCES = frozenset(
    {
        "awsElasticBlockStore",
        "azureDisk",
        "azureFile",
        "cephfs",
        "cinder",
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "fc",
        "flexVolume",
        "flocker",
        "gcePersistentDisk",
        "gitRepo",
        "glusterfs",
        "hostPath",
        "iscsi",
        "nfs",
        "persistentVolumeClaim",
        "photonPersistentDisk",
        "portworxVolume",
        "projected",
        "quobyte",
        "rbd",
        "scaleIO",
        "secret",
        "storageos",
        "vsphereVolume",
    }
)
CONCURRENCY_POLICIES = ("Forbid", "Replace")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: the field, a CamelCase reason for the condition, a message."""

    field: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class SourceSpec:
    volume: dict[str, Any]
    sub_path: str


@dataclass(frozen=True)
class QdrantSpec:
    url: str | None
    path: str | None
    volume: dict[str, Any] | None
    api_key: SecretKeyRef | None


@dataclass(frozen=True)
class EmbeddingSpec:
    provider: str
    model: str | None
    api_key: SecretKeyRef | None
    base_url: str | None


@dataclass(frozen=True)
class ResourcesSpec:
    memory: int  # bytes
    cpu: str
    cpu_request: str | None


@dataclass(frozen=True)
class MemoryRetrySpec:
    factor: float
    max_memory: int  # bytes
    max_attempts: int


@dataclass(frozen=True)
class FailureRetrySpec:
    max_retries: int
    backoff_seconds: int


@dataclass(frozen=True)
class TuningSpec:
    batch_size: int
    thread_pool_workers: int
    chunk_messages: int
    operational_memory_fraction: float
    settle_seconds: float | None
    checkpoint_seconds: float | None


@dataclass(frozen=True)
class ImportRunSpec:
    source: SourceSpec
    qdrant: QdrantSpec
    embedding: EmbeddingSpec
    schedule: CronSchedule | None
    suspend: bool
    concurrency_policy: str
    starting_deadline_seconds: int | None
    successful_runs_history_limit: int
    failed_runs_history_limit: int
    resources: ResourcesSpec
    memory_retry: MemoryRetrySpec
    failure_retry: FailureRetrySpec
    parallelism: int
    tuning: TuningSpec
    image: str

    def secret_refs(self) -> list[tuple[str, SecretKeyRef]]:
        """The Secrets the importer will read, with the field that names each."""
        refs = []
        if self.qdrant.api_key:
            refs.append(("spec.qdrant.apiKeySecretRef", self.qdrant.api_key))
        if self.embedding.api_key:
            refs.append(("spec.embedding.apiKeySecretRef", self.embedding.api_key))
        return refs

    def claim_refs(self) -> list[tuple[str, str]]:
        """The PersistentVolumeClaims the importer will mount, with the field that names each."""
        claims = []
        for field, volume in (
            ("spec.source.volume", self.source.volume),
            ("spec.qdrant.volume", self.qdrant.volume),
        ):
            claim = (volume or {}).get("persistentVolumeClaim", {}).get("claimName")
            if claim:
                claims.append((f"{field}.persistentVolumeClaim.claimName", str(claim)))
        return claims


def parse_spec(raw: Mapping[str, Any] | None, settings: Settings) -> tuple[ImportRunSpec | None, list[Problem]]:
    """The typed spec and no problems, or None and every problem found."""
    reader = _Reader(raw or {}, settings)
    spec = reader.read()
    return (spec, []) if not reader.problems else (None, reader.problems)


class _Reader:
    """Reads fields with their defaults and collects problems instead of stopping at the first."""

    def __init__(self, raw: Mapping[str, Any], settings: Settings) -> None:
        self.raw = raw
        self.settings = settings
        self.problems: list[Problem] = []

    def problem(self, field: str, message: str, reason: str = "InvalidSpec") -> None:
        self.problems.append(Problem(field, reason, message))

    def section(self, name: str) -> Mapping[str, Any]:
        value = self.raw.get(name) or {}
        if not isinstance(value, Mapping):
            self.problem(f"spec.{name}", "must be an object")
            return {}
        return value

    def read(self) -> ImportRunSpec:
        embedding = self.embedding()
        resources = self.resources(embedding.provider)
        return ImportRunSpec(
            source=self.source(),
            qdrant=self.qdrant(),
            embedding=embedding,
            schedule=self.schedule(),
            suspend=bool(self.raw.get("suspend", False)),
            concurrency_policy=self.choice("concurrencyPolicy", CONCURRENCY_POLICIES, "Forbid"),
            starting_deadline_seconds=self.optional_int("startingDeadlineSeconds", minimum=0),
            successful_runs_history_limit=self.integer(self.raw, "spec.successfulRunsHistoryLimit", 3, minimum=0),
            failed_runs_history_limit=self.integer(self.raw, "spec.failedRunsHistoryLimit", 1, minimum=0),
            resources=resources,
            memory_retry=self.memory_retry(resources.memory),
            failure_retry=self.failure_retry(),
            parallelism=self.integer(self.raw, "spec.parallelism", 1, minimum=1, maximum=64),
            tuning=self.tuning(),
            image=str(self.raw.get("image") or self.settings.importer_image),
        )

    # -- sections -------------------------------------------------------------------------------------

    def source(self) -> SourceSpec:
        section = self.section("source")
        volume = self.volume(section.get("volume"), "spec.source.volume", required=True)
        sub_path = str(section.get("subPath") or "").strip("/")
        if ".." in sub_path.split("/"):
            self.problem("spec.source.subPath", f"{sub_path!r} must stay inside the volume (no '..')")
        return SourceSpec(volume=volume or {}, sub_path=sub_path)

    def qdrant(self) -> QdrantSpec:
        section = self.section("qdrant")
        url = section.get("url") or None
        path = section.get("path")
        volume = self.volume(section.get("volume"), "spec.qdrant.volume", required=False)
        if (url is None) == (path is None):
            self.problem("spec.qdrant", "give exactly one of url (a Qdrant server) or path (an embedded store)")
        if url is not None and not str(url).startswith(("http://", "https://")):
            self.problem("spec.qdrant.url", f"{url!r} must start with http:// or https://")
        if path is not None:
            path = str(path).strip("/")
            if ".." in path.split("/"):
                self.problem("spec.qdrant.path", f"{path!r} must stay inside the volume (no '..')")
            if volume is None:
                self.problem("spec.qdrant.volume", "an embedded store (qdrant.path) needs a volume to live on")
        if url is not None and volume is not None:
            self.problem("spec.qdrant.volume", "only an embedded store (qdrant.path) uses a volume")
        api_key = self.secret_ref(section.get("apiKeySecretRef"), "spec.qdrant.apiKeySecretRef")
        return QdrantSpec(url=url, path=path, volume=volume, api_key=api_key)

    def embedding(self) -> EmbeddingSpec:
        section = self.section("embedding")
        provider = self.choice("provider", PROVIDERS, "fastembed", section, "spec.embedding")
        api_key = self.secret_ref(section.get("apiKeySecretRef"), "spec.embedding.apiKeySecretRef")
        if provider == "voyage" and api_key is None:
            self.problem("spec.embedding.apiKeySecretRef", "the voyage provider needs an API key Secret")
        return EmbeddingSpec(
            provider=provider,
            model=section.get("model") or None,
            api_key=api_key,
            base_url=section.get("baseUrl") or None,
        )

    def schedule(self) -> CronSchedule | None:
        expression = self.raw.get("schedule")
        time_zone = self.raw.get("timeZone") or None
        if time_zone:  # checked even without a schedule: a wrong zone is worth saying
            try:
                parse_zone(str(time_zone))
            except ScheduleError as error:
                self.problem(error.field, str(error), "UnknownTimeZone")
                time_zone = None
        if not expression:
            return None
        try:
            return CronSchedule.parse(str(expression), time_zone)
        except ScheduleError as error:
            self.problem(error.field, str(error), "InvalidSchedule")
            return None

    def resources(self, provider: str) -> ResourcesSpec:
        section = self.section("resources")
        memory = self.memory(section.get("memory") or self.settings.default_memory, "spec.resources.memory")
        minimum = parse_quantity_bytes(self.settings.min_memory.get(provider, "0") or "1")
        if memory and memory < minimum:
            self.problem(
                "spec.resources.memory",
                f"{format_memory(memory)} is below the {format_memory(minimum)} the importer needs to load "
                f"the {provider} model",
                "MemoryTooLow",
            )
        cpu = str(section.get("cpu") or self.settings.default_cpu)
        cpu_request = section.get("cpuRequest")
        for field, value in (("cpu", cpu), ("cpuRequest", cpu_request)):
            if value is not None:
                self.cpu(str(value), f"spec.resources.{field}")
        return ResourcesSpec(memory=memory, cpu=cpu, cpu_request=str(cpu_request) if cpu_request else None)

    def memory_retry(self, memory: int) -> MemoryRetrySpec:
        section = self.section("memoryRetry")
        factor = float(section.get("factor", 1.5))
        if factor <= 1:
            self.problem("spec.memoryRetry.factor", f"{factor} must be greater than 1")
        max_memory = self.memory(section.get("maxMemory") or "2Gi", "spec.memoryRetry.maxMemory")
        if memory and max_memory and max_memory < memory:
            self.problem(
                "spec.memoryRetry.maxMemory",
                f"{format_memory(max_memory)} is below spec.resources.memory {format_memory(memory)}",
            )
        attempts = self.integer(section, "spec.memoryRetry.maxAttempts", 3, minimum=1, maximum=20)
        return MemoryRetrySpec(factor=factor, max_memory=max_memory, max_attempts=attempts)

    def failure_retry(self) -> FailureRetrySpec:
        section = self.section("failureRetry")
        return FailureRetrySpec(
            max_retries=self.integer(section, "spec.failureRetry.maxRetries", 2, minimum=0, maximum=20),
            backoff_seconds=self.integer(section, "spec.failureRetry.backoffSeconds", 10, minimum=0),
        )

    def tuning(self) -> TuningSpec:
        section = self.section("tuning")
        fraction = float(section.get("operationalMemoryFraction", 0.8))
        if not 0 < fraction <= 1:
            self.problem("spec.tuning.operationalMemoryFraction", f"{fraction} must be in (0, 1]")
        settle, checkpoint = section.get("settleSeconds"), section.get("checkpointSeconds")
        return TuningSpec(
            batch_size=self.integer(section, "spec.tuning.batchSize", 8, minimum=1),
            thread_pool_workers=self.integer(section, "spec.tuning.threadPoolWorkers", 2, minimum=1),
            chunk_messages=self.integer(section, "spec.tuning.chunkMessages", 5, minimum=1),
            operational_memory_fraction=fraction,
            settle_seconds=float(settle) if settle is not None else None,
            checkpoint_seconds=float(checkpoint) if checkpoint is not None else None,
        )

    # -- field readers ---------------------------------------------------------------------------------

    def volume(self, value: Any, field: str, *, required: bool) -> dict[str, Any] | None:
        if value is None:
            if required:
                self.problem(field, "is required (any core/v1 volume source, e.g. persistentVolumeClaim)")
            return None
        if not isinstance(value, Mapping) or len(value) != 1:
            self.problem(field, "must name exactly one volume source (e.g. persistentVolumeClaim: {claimName: x})")
            return None
        (kind,) = value
        if kind not in VOLUME_SOURCES:
            self.problem(field, f"{kind!r} is not a core/v1 volume source")
            return None
        return dict(value)

    def secret_ref(self, value: Any, field: str) -> SecretKeyRef | None:
        if value is None:
            return None
        if not isinstance(value, Mapping) or not value.get("name") or not value.get("key"):
            self.problem(field, "needs both name and key")
            return None
        return SecretKeyRef(name=str(value["name"]), key=str(value["key"]))

    def memory(self, value: Any, field: str) -> int:
        try:
            return parse_quantity_bytes(value)
        except QuantityError as error:
            self.problem(field, str(error))
            return 0

    def cpu(self, value: str, field: str) -> None:
        try:
            if parse_quantity_decimal(value) <= 0:
                self.problem(field, f"{value!r} must be positive")
        except QuantityError as error:
            self.problem(field, str(error))

    def choice(
        self,
        name: str,
        allowed: tuple[str, ...],
        default: str,
        section: Mapping[str, Any] | None = None,
        prefix: str = "spec",
    ) -> str:
        value = str((self.raw if section is None else section).get(name) or default)
        if value not in allowed:
            self.problem(f"{prefix}.{name}", f"{value!r} must be one of {', '.join(allowed)}")
            return default
        return value

    def optional_int(self, name: str, minimum: int) -> int | None:
        if self.raw.get(name) is None:
            return None
        return self.integer(self.raw, f"spec.{name}", 0, minimum=minimum)

    def integer(
        self, section: Mapping[str, Any], field: str, default: int, minimum: int, maximum: int | None = None
    ) -> int:
        raw = section.get(field.rsplit(".", 1)[-1], default)
        try:
            value = int(raw)
        except (TypeError, ValueError):
            self.problem(field, f"{raw!r} is not an integer")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" + (f" and at most {maximum}" if maximum is not None else "")
            self.problem(field, f"{value} must be {bounds}")
            return default
        return value
