"""The operator's own settings, all from environment variables (the chart's Deployment sets them)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from .quantity import QuantityError, parse_quantity_bytes

PREFIX = "REFLECTION_"
LOG_FORMATS = ("auto", "json", "plain")


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    #: Image of the importer Jobs when an ImportRun names none.
    importer_image: str = "reflection-importer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    #: The importer's command inside its image.
    importer_command: tuple[str, ...] = ("python", "-m", "importer", "run")
    #: ServiceAccount the importer Pods run under (its Role allows only ConfigMaps).
    importer_service_account: str = "reflection-importer"
    #: Namespaces to watch; empty means every namespace.
    namespaces: tuple[str, ...] = ()
    #: Container limits when an ImportRun's spec.resources leaves them out.
    default_memory: str = "1Gi"
    default_cpu: str = "1"
    #: Below these the importer cannot even load its model: such specs are refused as invalid. Measured: the
    #: importer with the loaded all-MiniLM-L6-v2 takes ~250 MiB before embedding anything; with Voyage
    #: (no local model) its libraries take ~100 MiB.
    min_memory: Mapping[str, str] = field(default_factory=lambda: {"fastembed": "256Mi", "voyage": "128Mi"})
    #: Folder of the prepared FastEmbed model inside the importer's image (IMPORTER_MODEL_DIR); empty: the
    #: importer's default.
    importer_model_dir: str = ""
    #: UID/GID the importer runs as (non-root).
    run_as_user: int = 65532
    #: Finished Jobs are deleted this long after finishing (0: only the history limits delete them).
    job_ttl_seconds: int = 7 * 24 * 3600
    #: Port of the Prometheus metrics endpoint (0: no endpoint).
    metrics_port: int = 9090
    #: Port of kopf's liveness endpoint (/healthz); 0: none.
    liveness_port: int = 8080
    #: Each ImportRun is reconciled at least this often even when nothing is heard of it.
    resync_seconds: float = 300.0
    #: Log format: json (structured, for the cluster), plain, or auto: plain when standard error is a terminal.
    log_format: str = "auto"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()

        def text(name: str, default: str) -> str:
            return env.get(PREFIX + name, "").strip() or default

        settings = cls(
            importer_image=text("IMPORTER_IMAGE", defaults.importer_image),
            image_pull_policy=text("IMAGE_PULL_POLICY", defaults.image_pull_policy),
            importer_command=tuple(shlex.split(text("IMPORTER_COMMAND", shlex.join(defaults.importer_command)))),
            importer_service_account=text("IMPORTER_SERVICE_ACCOUNT", defaults.importer_service_account),
            namespaces=tuple(n.strip() for n in text("NAMESPACES", "").split(",") if n.strip()),
            default_memory=text("DEFAULT_MEMORY", defaults.default_memory),
            default_cpu=text("DEFAULT_CPU", defaults.default_cpu),
            min_memory={
                "fastembed": text("MIN_MEMORY_FASTEMBED", defaults.min_memory["fastembed"]),
                "voyage": text("MIN_MEMORY_VOYAGE", defaults.min_memory["voyage"]),
            },
            importer_model_dir=text("IMPORTER_MODEL_DIR", ""),
            run_as_user=_integer(env, "RUN_AS_USER", defaults.run_as_user),
            job_ttl_seconds=_integer(env, "JOB_TTL_SECONDS", defaults.job_ttl_seconds),
            metrics_port=_integer(env, "METRICS_PORT", defaults.metrics_port),
            liveness_port=_integer(env, "LIVENESS_PORT", defaults.liveness_port),
            resync_seconds=float(_integer(env, "RESYNC_SECONDS", int(defaults.resync_seconds))),
            log_format=text("LOG_FORMAT", defaults.log_format),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        for name, value in (("DEFAULT_MEMORY", self.default_memory), ("DEFAULT_CPU", self.default_cpu)):
            _quantity(name, value)
        for provider, value in self.min_memory.items():
            _quantity(f"MIN_MEMORY_{provider.upper()}", value)
        if not self.importer_command:
            raise SettingsError(f"{PREFIX}IMPORTER_COMMAND must not be empty")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"{PREFIX}LOG_FORMAT={self.log_format!r}: must be one of {', '.join(LOG_FORMATS)}")

    def json_logs(self, terminal: bool) -> bool:
        """Whether to log JSON, given whether standard error is a terminal."""
        return self.log_format == "json" or (self.log_format == "auto" and not terminal)


def _integer(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(PREFIX + name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as error:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: not an integer") from error
    if value < 0:
        raise SettingsError(f"{PREFIX}{name}={raw!r}: must not be negative")
    return value


def _quantity(name: str, value: str) -> None:
    try:
        parse_quantity_bytes(value)
    except QuantityError as error:
        raise SettingsError(f"{PREFIX}{name}={value!r}: {error}") from error
