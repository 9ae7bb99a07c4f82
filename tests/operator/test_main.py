"""``python -m reflection_operator``: its version and how it chooses its log format."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from reflection_operator.settings import Settings, SettingsError


def test_version_is_the_installed_projects() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "reflection_operator", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"reflection-operator {importlib.metadata.version('reflection-operator')}"


@pytest.mark.parametrize(
    ("log_format", "terminal", "json_logs"),
    [
        ("auto", True, False),
        ("auto", False, True),
        ("json", True, True),
        ("plain", False, False),
    ],
)
def test_log_format_follows_the_setting_and_otherwise_the_terminal(
    log_format: str, terminal: bool, json_logs: bool
) -> None:
    settings = Settings.from_env({"REFLECTION_LOG_FORMAT": log_format})
    assert settings.json_logs(terminal) is json_logs


def test_an_unknown_log_format_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="REFLECTION_LOG_FORMAT='yaml'"):
        Settings.from_env({"REFLECTION_LOG_FORMAT": "yaml"})


def test_auto_is_the_default() -> None:
    assert Settings.from_env({}).log_format == "auto"
