"""How the test kubelet turns a Pod spec into a process's environment and folders (no cluster needed)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from localcluster import podspec
from localcluster.podspec import ConfigError, PathRewriter


def test_mount_paths_are_rewritten_at_path_boundaries_longest_first(tmp_path: Path) -> None:
    rewriter = PathRewriter({"/data": tmp_path / "d", "/data/models": tmp_path / "m", "/": tmp_path / "root"})
    assert rewriter.rewrite("/data/x.jsonl") == f"{tmp_path}/d/x.jsonl"
    assert rewriter.rewrite("/data/models/minilm") == f"{tmp_path}/m/minilm"
    assert rewriter.rewrite("--source=/data") == f"--source={tmp_path}/d"
    assert rewriter.rewrite("/database/x") == "/database/x"
    assert rewriter.rewrite("a:/data/models:/data") == f"a:{tmp_path}/m:{tmp_path}/d"
    assert rewriter.rewrite("relative/data/x") == "relative/data/x"


def test_variable_references_expand_like_kubernetes() -> None:
    env = {"A": "1", "B": "two"}
    assert podspec.expand_references("$(A)-$(B)", env) == "1-two"
    assert podspec.expand_references("$(MISSING)", env) == "$(MISSING)"
    assert podspec.expand_references("$$(A)", env) == "$(A)"


def _pod(container: dict) -> dict:
    meta = {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "x"}}
    return {"metadata": meta, "spec": {"nodeName": "n", "containers": [container]}, "status": {}}


def test_environment_from_secrets_config_maps_and_the_downward_api() -> None:
    objects = {
        ("Secret", "ns", "s"): {"data": {"token": base64.b64encode(b"sekrit").decode()}},
        ("ConfigMap", "ns", "c"): {"data": {"mode": "fast", "level": "3"}},
    }
    container = {
        "name": "main",
        "resources": {"limits": {"memory": "512Mi"}},
        "envFrom": [{"configMapRef": {"name": "c"}, "prefix": "CFG_"}],
        "env": [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "GREETING", "value": "$(POD) in $(CFG_mode)"},
        ],
    }
    env = podspec.container_env(_pod(container), container, lambda *key: objects.get(key), {"cpu": "4"})
    assert env == {
        "CFG_mode": "fast",
        "CFG_level": "3",
        "TOKEN": "sekrit",
        "POD": "p",
        "APP": "x",
        "MEM": str(512 * 1024 * 1024),
        "MEM_MI": "512",
        "CPU": "4",
        "GREETING": "p in fast",
    }


def test_a_missing_secret_key_is_a_config_error_unless_optional() -> None:
    ref: dict[str, Any] = {"name": "T", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}
    container = {"name": "main", "env": [ref]}
    with pytest.raises(ConfigError, match="absent"):
        podspec.container_env(_pod(container), container, lambda *key: None, {})
    ref["valueFrom"]["secretKeyRef"]["optional"] = True
    assert podspec.container_env(_pod(container), container, lambda *key: None, {}) == {}


def test_volumes_become_local_folders(tmp_path: Path) -> None:
    pod = _pod({"name": "main"})
    pod["spec"]["volumes"] = [
        {"name": "claim", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "host", "hostPath": {"path": str(tmp_path / "host"), "type": "DirectoryOrCreate"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "conf", "configMap": {"name": "c", "items": [{"key": "mode", "path": "sub/mode.txt"}]}},
    ]
    objects = {("ConfigMap", "ns", "c"): {"data": {"mode": "fast"}}}
    ctx = podspec.VolumeContext(pod, tmp_path / "pod", tmp_path / "pvc", lambda *key: objects.get(key))
    volumes = podspec.prepare_volumes(ctx)
    assert volumes["claim"] == tmp_path / "pvc" / "ns" / "data"
    assert volumes["host"] == tmp_path / "host"
    assert all(folder.is_dir() for folder in volumes.values())
    assert (volumes["conf"] / "sub" / "mode.txt").read_text() == "fast"
    mounts = podspec.container_mounts(
        {"volumeMounts": [{"name": "claim", "mountPath": "/data", "subPath": "run1"}]}, volumes
    )
    assert mounts == {"/data": tmp_path / "pvc" / "ns" / "data" / "run1"}
