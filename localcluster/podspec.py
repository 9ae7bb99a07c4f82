"""Turn a Pod's spec into what a local process needs: its environment, its folders, its rewritten paths.

Everything here works on the Pod as the API server returns it (a dict); nothing talks to the API server
directly: Secrets and ConfigMaps are fetched through the ``Lookup`` the caller passes in.
"""

from __future__ import annotations

import base64
import math
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from kubernetes.utils.quantity import parse_quantity

JsonDict = dict[str, Any]
#: Fetches a ConfigMap or Secret: (kind, namespace, name) -> the object, or None when it does not exist.
Lookup = Callable[[str, str, str], JsonDict | None]

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ConfigError(Exception):
    """The container cannot start yet (a missing Secret, ConfigMap or key): the kubelet retries later."""


def expand_references(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, the rest stays as is."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _REFERENCE.sub(replace, text)


class PathRewriter:
    """Maps container paths (mount points) to local folders inside any string that mentions them.

    A mount path is replaced only where it stands as a whole path component at the start of a path
    (``/data`` in ``--out=/data/x`` but not in ``/database``); the longest mount path wins.
    """

    def __init__(self, mounts: Mapping[str, Path]) -> None:
        self.mounts = {_normalise(mount): local for mount, local in mounts.items()}
        ordered = sorted(self.mounts, key=len, reverse=True)
        alternatives = "|".join(re.escape(m) for m in ordered)
        self._pattern = re.compile(rf"(?<![\w./-])(?:{alternatives})(?![\w.-])") if ordered else None

    def rewrite(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: str(self.mounts[m.group(0)]), text)


def _normalise(mount_path: str) -> str:
    return mount_path.rstrip("/") or "/"


def field_value(pod: JsonDict, field_path: str) -> str:
    """The downward API's fieldRef values."""
    metadata, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", ""),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": status.get("hostIP", "127.0.0.1"),
        "status.podIP": status.get("podIP", "127.0.0.1"),
    }
    if field_path in simple:
        return str(simple[field_path])
    keyed = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", field_path)
    if keyed:
        return str(metadata.get(keyed.group(1), {}).get(keyed.group(2), ""))
    raise ConfigError(f"unsupported fieldRef {field_path!r}")


def resource_value(container: JsonDict, ref: JsonDict, allocatable: Mapping[str, str]) -> str:
    """The downward API's resourceFieldRef: limits fall back to the node's allocatable, like the kubelet's."""
    kind, _, name = ref["resource"].partition(".")
    resources = container.get("resources", {})
    raw = resources.get(kind, {}).get(name)
    if raw is None and kind == "requests":
        raw = resources.get("limits", {}).get(name)
    if raw is None:
        raw = allocatable.get(name, "0")
    divisor = parse_quantity(ref.get("divisor", "1"))
    if divisor == 0:
        divisor = Decimal(1)
    return str(math.ceil(parse_quantity(raw) / divisor))


def memory_limit_bytes(container: JsonDict) -> int | None:
    raw = container.get("resources", {}).get("limits", {}).get("memory")
    return int(parse_quantity(raw)) if raw is not None else None


def _data_of(obj: JsonDict, kind: str) -> dict[str, bytes]:
    """All keys of a ConfigMap or Secret, decoded to bytes."""
    values: dict[str, bytes] = {}
    if kind == "Secret":
        for key, encoded in (obj.get("data") or {}).items():
            values[key] = base64.b64decode(encoded)
        for key, text in (obj.get("stringData") or {}).items():
            values[key] = text.encode()
    else:
        for key, text in (obj.get("data") or {}).items():
            values[key] = text.encode()
        for key, encoded in (obj.get("binaryData") or {}).items():
            values[key] = base64.b64decode(encoded)
    return values


def _key_ref(lookup: Lookup, kind: str, namespace: str, ref: JsonDict) -> str | None:
    obj = lookup(kind, namespace, ref["name"])
    data = _data_of(obj, kind) if obj is not None else None
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        what = f"{kind} {namespace}/{ref['name']}" + ("" if data is None else f" key {ref['key']!r}")
        raise ConfigError(f"{what} not found")
    return data[ref["key"]].decode(errors="replace")


def container_env(pod: JsonDict, container: JsonDict, lookup: Lookup, allocatable: Mapping[str, str]) -> dict[str, str]:
    """The container's environment as a kubelet computes it: envFrom, then env, with $(VAR) expansion."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind, ref = (
            ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        )
        obj = lookup(kind, namespace, ref["name"])
        if obj is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f"{kind} {namespace}/{ref['name']} not found")
        prefix = source.get("prefix", "")
        env.update({prefix + k: v.decode(errors="replace") for k, v in _data_of(obj, kind).items()})
    for item in container.get("env") or []:
        value = _env_value(pod, container, item, lookup, allocatable, env)
        if value is not None:
            env[item["name"]] = value
    return env


def _env_value(
    pod: JsonDict,
    container: JsonDict,
    item: JsonDict,
    lookup: Lookup,
    allocatable: Mapping[str, str],
    env_so_far: Mapping[str, str],
) -> str | None:
    if "valueFrom" not in item:
        return expand_references(item.get("value", ""), env_so_far)
    source = item["valueFrom"]
    namespace = pod["metadata"]["namespace"]
    if "secretKeyRef" in source:
        return _key_ref(lookup, "Secret", namespace, source["secretKeyRef"])
    if "configMapKeyRef" in source:
        return _key_ref(lookup, "ConfigMap", namespace, source["configMapKeyRef"])
    if "fieldRef" in source:
        return field_value(pod, source["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in source:
        return resource_value(container, source["resourceFieldRef"], allocatable)
    raise ConfigError(f"unsupported valueFrom in env {item['name']!r}")


@dataclass
class VolumeContext:
    pod: JsonDict
    pod_dir: Path
    pvc_root: Path
    lookup: Lookup


def prepare_volumes(ctx: VolumeContext) -> dict[str, Path]:
    """Create a local folder for each of the Pod's volumes; return {volume name: folder}."""
    folders: dict[str, Path] = {}
    for volume in ctx.pod.get("spec", {}).get("volumes") or []:
        folders[volume["name"]] = _prepare_volume(ctx, volume)
    return folders


def _prepare_volume(ctx: VolumeContext, volume: JsonDict) -> Path:
    namespace = ctx.pod["metadata"]["namespace"]
    own_folder = ctx.pod_dir / "volumes" / volume["name"]
    if "hostPath" in volume:
        path = Path(volume["hostPath"]["path"])
        if volume["hostPath"].get("type") == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        return path
    if "persistentVolumeClaim" in volume:
        folder = ctx.pvc_root / namespace / volume["persistentVolumeClaim"]["claimName"]
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    if own_folder.exists():
        shutil.rmtree(own_folder)
    own_folder.mkdir(parents=True)
    if "configMap" in volume or "secret" in volume:
        _write_key_files(ctx, volume, own_folder)
    # emptyDir (and what this kubelet does not know, e.g. downwardAPI or projected) is a fresh empty folder.
    return own_folder


def _write_key_files(ctx: VolumeContext, volume: JsonDict, folder: Path) -> None:
    if "configMap" in volume:
        kind, source, name = "ConfigMap", volume["configMap"], volume["configMap"]["name"]
    else:
        kind, source, name = "Secret", volume["secret"], volume["secret"]["secretName"]
    obj = ctx.lookup(kind, ctx.pod["metadata"]["namespace"], name)
    if obj is None:
        if source.get("optional"):
            return
        raise ConfigError(f"{kind} {ctx.pod['metadata']['namespace']}/{name} not found")
    data = _data_of(obj, kind)
    items = source.get("items") or [{"key": key, "path": key} for key in data]
    for item in items:
        if item["key"] not in data:
            raise ConfigError(f"{kind} {name} has no key {item['key']!r}")
        target = folder / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[item["key"]])
        target.chmod(item.get("mode", source.get("defaultMode", 0o644)))


def container_mounts(container: JsonDict, volumes: Mapping[str, Path]) -> dict[str, Path]:
    """{mountPath: local folder} for one container, honouring subPath."""
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        if mount["name"] not in volumes:
            raise ConfigError(f"volumeMount {mount['name']!r} names no volume of the pod")
        local = volumes[mount["name"]]
        if mount.get("subPath"):
            local = local / mount["subPath"]
            local.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = local
    return mounts
