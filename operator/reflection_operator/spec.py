"""An ImportRun's spec as typed pydantic models, with the checks the CRD schema cannot make.

The models mirror the CRD's openAPIV3Schema field for field (names, types, defaults, bounds, enums: a test
compares the two), so a spec read without the API server's schema (unit tests, a CRD installed by hand)
means the same thing. On top of that come the checks the schema cannot make: cron expressions, time zones,
quantities, combinations of fields, memory limits against what the importer needs. Every problem names its
field (``spec.resources.memory``) so that the Ready condition can say what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails, PydanticCustomError

from importer.contract import DEFAULT_BATCH_SIZE

from .quantity import (
    CPU_PATTERN,
    MEMORY_PATTERN,
    QuantityError,
    format_memory,
    parse_quantity_bytes,
    parse_quantity_decimal,
)
from .schedule import CronSchedule, ScheduleError, parse_zone
from .settings import Settings

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
DEFAULT_MAX_MEMORY = "2Gi"
INVALID_SPEC = "InvalidSpec"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: the field, a CamelCase reason for the condition, a message."""

    field: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _invalid(message: str, reason: str = INVALID_SPEC) -> PydanticCustomError:
    # The error's type is the condition's reason (CamelCase, unlike pydantic's own snake_case types).
    return PydanticCustomError(reason, message)


# -- field types ---------------------------------------------------------------------------------------


def _memory_bytes(value: Any) -> int:
    if isinstance(value, bool):
        raise _invalid(f"{value!r} is not a valid quantity")
    try:
        return parse_quantity_bytes(value)
    except QuantityError as error:
        raise _invalid(str(error)) from error


def _cpu(value: Any) -> str:
    try:
        positive = parse_quantity_decimal(str(value)) > 0
    except QuantityError as error:
        raise _invalid(str(error)) from error
    if not positive:
        raise _invalid(f"{value!r} must be positive")
    return str(value)


def _one_volume_source(value: dict[str, Any]) -> dict[str, Any]:
    if len(value) != 1:
        raise _invalid("must name exactly one volume source (e.g. persistentVolumeClaim: {claimName: x})")
    (kind,) = value
    if kind not in VOLUME_SOURCES:
        raise _invalid(f"{kind!r} is not a core/v1 volume source")
    return value


def _inside_volume(value: str) -> str:
    path = value.strip("/")
    if ".." in path.split("/"):
        raise _invalid(f"{path!r} must stay inside the volume (no '..')")
    return path


#: Memory quantities in bytes (the CRD keeps them as strings).
Memory = Annotated[int, BeforeValidator(_memory_bytes), WithJsonSchema({"type": "string", "pattern": MEMORY_PATTERN})]
Cpu = Annotated[str, BeforeValidator(_cpu), WithJsonSchema({"type": "string", "pattern": CPU_PATTERN})]
Volume = Annotated[
    dict[str, Any],
    AfterValidator(_one_volume_source),
    WithJsonSchema({"type": "object", "minProperties": 1, "maxProperties": 1}),
]
#: A folder inside a volume: relative (the CRD's pattern), without "..".
SourceFolder = Annotated[str, Field(pattern=r"^[^/].*$", max_length=1024), AfterValidator(_inside_volume)]
#: The same, "" standing for the volume's root.
StoreFolder = Annotated[str, Field(pattern=r"^([^/].*)?$", max_length=1024), AfterValidator(_inside_volume)]
HttpUrl = Annotated[str, Field(pattern=r"^https?://.+")]


class _Section(BaseModel):
    # camelCase in the resource, snake_case in Python. Unknown fields are the API server's business (it
    # prunes them); null stands for "not given", as kubectl patches write it.
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="ignore",
        validate_default=True,
        arbitrary_types_allowed=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {key: value for key, value in data.items() if value is not None}
        return data


class SecretKeyRef(_Section):
    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


class SourceSpec(_Section):
    volume: Volume
    sub_path: SourceFolder = Field(default="", validate_default=False)


class QdrantSpec(_Section):
    url: HttpUrl | None = None
    path: StoreFolder | None = None
    volume: Volume | None = None
    api_key: SecretKeyRef | None = Field(default=None, alias="apiKeySecretRef")


class EmbeddingSpec(_Section):
    provider: Literal["fastembed", "voyage"] = "fastembed"
    model: str | None = None
    api_key: SecretKeyRef | None = Field(default=None, alias="apiKeySecretRef")
    base_url: HttpUrl | None = None


class ResourcesSpec(_Section):
    #: Bytes. Given by the operator's settings when the spec leaves it out (see ``parse_spec``).
    memory: Memory
    cpu: Cpu
    cpu_request: Cpu | None = None


class MemoryRetrySpec(_Section):
    factor: float = Field(default=1.5, gt=1, le=10)
    max_memory: Memory = Field(
        default=parse_quantity_bytes(DEFAULT_MAX_MEMORY), json_schema_extra={"default": DEFAULT_MAX_MEMORY}
    )
    max_attempts: int = Field(default=3, ge=1, le=20)


class FailureRetrySpec(_Section):
    max_retries: int = Field(default=2, ge=0, le=20)
    backoff_seconds: int = Field(default=10, ge=0, le=600)


class TuningSpec(_Section):
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=4096)
    thread_pool_workers: int = Field(default=2, ge=1, le=64)
    chunk_messages: int = Field(default=5, ge=1, le=1000)
    operational_memory_fraction: float = Field(default=0.8, ge=0.1, le=1)
    settle_seconds: float | None = Field(default=None, ge=0)
    checkpoint_seconds: float | None = Field(default=None, ge=0.1)


class ImportRunSpec(_Section):
    source: SourceSpec
    qdrant: QdrantSpec
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    # time_zone comes before schedule: the schedule's check reads it.
    time_zone: str | None = Field(default=None, min_length=1)
    schedule: Annotated[CronSchedule | None, WithJsonSchema({"type": "string", "minLength": 1})] = None
    suspend: bool = False
    concurrency_policy: Literal["Forbid", "Replace"] = "Forbid"
    starting_deadline_seconds: int | None = Field(default=None, ge=0)
    successful_runs_history_limit: int = Field(default=3, ge=0)
    failed_runs_history_limit: int = Field(default=1, ge=0)
    #: Required here; ``parse_spec`` fills in the operator's defaults before validating.
    resources: ResourcesSpec
    memory_retry: MemoryRetrySpec = Field(default_factory=MemoryRetrySpec)
    failure_retry: FailureRetrySpec = Field(default_factory=FailureRetrySpec)
    parallelism: int = Field(default=1, ge=1, le=64)
    tuning: TuningSpec = Field(default_factory=TuningSpec)
    #: Required here; ``parse_spec`` fills in the operator's default image.
    image: str = Field(min_length=1)

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:  # checked even without a schedule: a wrong zone is worth saying
            try:
                parse_zone(value)
            except ScheduleError as error:
                raise _invalid(str(error), "UnknownTimeZone") from error
        return value

    @field_validator("schedule", mode="before")
    @classmethod
    def _cron(cls, value: Any, info: ValidationInfo) -> CronSchedule | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise _invalid(f"{value!r} is not a cron expression (a string)", "InvalidSchedule")
        try:
            # An unknown zone was reported above; the expression is still checked, in UTC.
            return CronSchedule.parse(value, info.data.get("time_zone"))
        except ScheduleError as error:
            raise _invalid(str(error), "InvalidSchedule") from error

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


# -- parsing -------------------------------------------------------------------------------------------


def parse_spec(raw: Mapping[str, Any] | None, settings: Settings) -> tuple[ImportRunSpec | None, list[Problem]]:
    """The typed spec and no problems, or None and every problem found."""
    try:
        spec = ImportRunSpec.model_validate(_with_operator_defaults(_plain(raw or {}), settings))
    except ValidationError as error:
        return None, [_problem(detail) for detail in error.errors()]
    problems = _combination_problems(spec, settings)
    return (spec, []) if not problems else (None, problems)


def _with_operator_defaults(raw: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The defaults that come from the operator's settings rather than from the CRD."""
    resources = raw.get("resources")
    if resources is None or isinstance(resources, dict):
        given = {k: v for k, v in (resources or {}).items() if v not in (None, "")}
        raw["resources"] = {"memory": settings.default_memory, "cpu": settings.default_cpu, **given}
    if not raw.get("image"):
        raw["image"] = settings.importer_image
    return raw


def _plain(value: Any) -> Any:
    """kopf hands out read-only mapping views; pydantic reads plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _problem(detail: ErrorDetails) -> Problem:
    field = ".".join(["spec", *(str(part) for part in detail["loc"])])
    ours = detail["type"][:1].isupper()  # raised by a check here, its type a condition reason
    message, given = detail["msg"], detail.get("input")
    if not ours and detail["type"] != "missing" and not isinstance(given, dict):
        message = f"{given!r}: {message}"  # pydantic's own messages do not quote the value
    return Problem(field, detail["type"] if ours else INVALID_SPEC, message)


def _combination_problems(spec: ImportRunSpec, settings: Settings) -> list[Problem]:
    """The checks that read more than one field."""
    problems: list[Problem] = []

    def problem(field: str, message: str, reason: str = INVALID_SPEC) -> None:
        problems.append(Problem(field, reason, message))

    qdrant = spec.qdrant
    if (qdrant.url is None) == (qdrant.path is None):
        problem("spec.qdrant", "give exactly one of url (a Qdrant server) or path (an embedded store)")
    if qdrant.path is not None and qdrant.volume is None:
        problem("spec.qdrant.volume", "an embedded store (qdrant.path) needs a volume to live on")
    if qdrant.url is not None and qdrant.volume is not None:
        problem("spec.qdrant.volume", "only an embedded store (qdrant.path) uses a volume")
    provider = spec.embedding.provider
    if provider == "voyage" and spec.embedding.api_key is None:
        problem("spec.embedding.apiKeySecretRef", "the voyage provider needs an API key Secret")
    memory = spec.resources.memory
    minimum = parse_quantity_bytes(settings.min_memory.get(provider, "0") or "1")
    if memory < minimum:
        problem(
            "spec.resources.memory",
            f"{format_memory(memory)} is below the {format_memory(minimum)} the importer needs to load the "
            f"{provider} model",
            "MemoryTooLow",
        )
    if spec.memory_retry.max_memory < memory:
        problem(
            "spec.memoryRetry.maxMemory",
            f"{format_memory(spec.memory_retry.max_memory)} is below spec.resources.memory {format_memory(memory)}",
        )
    return problems
