"""Fixtures for the chart, manifests, examples and image tests.

(pytest runs with --import-mode=importlib, so helpers reach the tests as fixtures, not imports.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster.cluster import helm_binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "reflection-operator"
MAKE_CORPUS = Path(os.environ.get("REFLECTION_SHARED", REPO.parent / "shared")) / "corpus" / "make_corpus.py"


class Helm:
    """The real helm binary; against the local cluster when one is given."""

    def __init__(self, cluster: Any = None) -> None:
        self.cluster = cluster

    def run(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = self.cluster.helm_env() if self.cluster is not None else None
        result = subprocess.run(
            [str(helm_binary()), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def template(self, *values: str, release: str = "ro", namespace: str = "demo") -> list[dict[str, Any]]:
        """The chart rendered with ``--set`` values: its objects (CRDs are not among them)."""
        sets = [arg for value in values for arg in ("--set", value)]
        output = self.run("template", release, str(CHART), "--namespace", namespace, *sets).stdout
        return [doc for doc in yaml.safe_load_all(output) if doc]


@pytest.fixture(scope="session")
def helm() -> Helm:
    """helm without a cluster (template, lint)."""
    return Helm()


@pytest.fixture(scope="session")
def cluster_helm(kube_cluster: Any) -> Helm:
    """helm against the local control plane."""
    return Helm(kube_cluster)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, (
        f"{len(matches)} {kind} {name or ''} in {[(o['kind'], o['metadata']['name']) for o in objects]}"
    )
    return matches[0]


@pytest.fixture(name="find")
def find_fixture() -> Callable[..., dict[str, Any]]:
    return find


@pytest.fixture(scope="session")
def logs_tree(pod_readable_dir: Callable[[str], Path]) -> Path:
    """A volume's root holding a generated conversation tree in its folder "projects" (the examples' subPath),
    readable by the Pods that mount it."""
    root = pod_readable_dir("chart-logs")
    subprocess.run(
        [sys.executable, str(MAKE_CORPUS), str(root / "projects"), "--files", "6", "--profile", "small"],
        check=True,
        capture_output=True,
    )
    return root


def kubectl_json(cluster: Any, *args: str) -> Any:
    result = cluster.kubectl_run(*args, "-o", "json")
    if result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
    return json.loads(result.stdout)


@pytest.fixture(name="kubectl_json")
def kubectl_json_fixture() -> Callable[..., Any]:
    return kubectl_json
