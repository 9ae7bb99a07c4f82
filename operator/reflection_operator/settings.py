"""The operator's own settings, all from environment variables (the chart's Deployment sets them).

A pydantic model, like the ImportRun spec: every value is checked, and an error names the variable at fault.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError

from .quantity import QuantityError, parse_quantity_bytes

PREFIX = "REFLECTION_"


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use; the message names it."""


def _checked_quantity(value: str) -> str:
    try:
        parse_quantity_bytes(value)
    except QuantityError as error:
        raise ValueError(str(error)) from error
    return value


Quantity = Annotated[str, AfterValidator(_checked_quantity)]


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Image of the importer Jobs when an ImportRun names none.
    importer_image: str = "reflection-importer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    #: The importer's command inside its image.
    importer_command: tuple[str, ...] = Field(default=("python", "-m", "importer", "run"), min_length=1)
    #: ServiceAccount the importer Pods run under (its Role allows only ConfigMaps).
    importer_service_account: str = "reflection-importer"
    #: Namespaces to watch; empty means every namespace.
    namespaces: tuple[str, ...] = ()
    #: Container limits when an ImportRun's spec.resources leaves them out.
    default_memory: Quantity = "1Gi"
    default_cpu: Quantity = "1"
    #: Below these the importer cannot even load its model: such specs are refused as invalid. Measured: the
    #: importer with the loaded all-MiniLM-L6-v2 takes ~250 MiB before embedding anything; with Voyage
    #: (no local model) its libraries take ~100 MiB.
    min_memory: dict[str, Quantity] = Field(default_factory=lambda: {"fastembed": "256Mi", "voyage": "128Mi"})
    #: Folder of the prepared model inside the importer's image (IMPORTER_MODEL_DIR); empty: the importer's default.
    importer_model_dir: str = ""
    #: UID/GID the importer runs as (non-root).
    run_as_user: NonNegativeInt = 65532
    #: Finished Jobs are deleted this long after finishing (0: only the history limits delete them).
    job_ttl_seconds: NonNegativeInt = 7 * 24 * 3600
    #: Port of the Prometheus metrics endpoint (0: no endpoint).
    metrics_port: NonNegativeInt = 9090
    #: Port of kopf's liveness endpoint (/healthz); 0: none.
    liveness_port: NonNegativeInt = 8080
    #: Each ImportRun is reconciled at least this often even when nothing is heard of it.
    resync_seconds: NonNegativeInt = 300
    #: Log format: json (structured, for the cluster), plain, or auto: plain when standard error is a terminal.
    log_format: Literal["auto", "json", "plain"] = "auto"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings the ``REFLECTION_*`` variables give; an unset or blank one keeps its default."""
        env = os.environ if environ is None else environ
        raw = {name: value.strip() for name in _VARIABLES if (value := env.get(PREFIX + name, "").strip())}
        values: dict[str, Any] = {}
        for name, text in raw.items():
            field, read = _VARIABLES[name]
            values[field] = read(text)
        if "MIN_MEMORY_FASTEMBED" in raw or "MIN_MEMORY_VOYAGE" in raw:
            values["min_memory"] = cls().min_memory | {
                provider: raw[f"MIN_MEMORY_{provider.upper()}"]
                for provider in ("fastembed", "voyage")
                if f"MIN_MEMORY_{provider.upper()}" in raw
            }
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            raise SettingsError("; ".join(_describe(problem, raw) for problem in error.errors())) from None

    def json_logs(self, terminal: bool) -> bool:
        """Whether to log JSON, given whether standard error is a terminal."""
        return self.log_format == "json" or (self.log_format == "auto" and not terminal)


def _text(value: str) -> str:
    return value


def _names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


#: Variable (without the prefix) → the setting it gives and how its text is read before validation.
_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "IMPORTER_IMAGE": ("importer_image", _text),
    "IMAGE_PULL_POLICY": ("image_pull_policy", _text),
    "IMPORTER_COMMAND": ("importer_command", lambda value: tuple(shlex.split(value))),
    "IMPORTER_SERVICE_ACCOUNT": ("importer_service_account", _text),
    "NAMESPACES": ("namespaces", _names),
    "DEFAULT_MEMORY": ("default_memory", _text),
    "DEFAULT_CPU": ("default_cpu", _text),
    "MIN_MEMORY_FASTEMBED": ("min_memory", _text),
    "MIN_MEMORY_VOYAGE": ("min_memory", _text),
    "IMPORTER_MODEL_DIR": ("importer_model_dir", _text),
    "RUN_AS_USER": ("run_as_user", _text),
    "JOB_TTL_SECONDS": ("job_ttl_seconds", _text),
    "METRICS_PORT": ("metrics_port", _text),
    "LIVENESS_PORT": ("liveness_port", _text),
    "RESYNC_SECONDS": ("resync_seconds", _text),
    "LOG_FORMAT": ("log_format", _text),
}


def _describe(problem: Mapping[str, Any], raw: Mapping[str, str]) -> str:
    """One validation problem, named by the variable that caused it: ``REFLECTION_X='value': message``."""
    field, *rest = [str(part) for part in problem["loc"]]
    if field == "min_memory" and rest:
        name = f"MIN_MEMORY_{rest[0].upper()}"
    else:
        name = next(var for var, (target, _) in _VARIABLES.items() if target == field)
    return f"{PREFIX}{name}={raw.get(name, '')!r}: {problem['msg']}"
