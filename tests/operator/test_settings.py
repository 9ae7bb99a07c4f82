"""The operator's settings from REFLECTION_* variables: defaults, parsing, and errors naming each variable."""

from __future__ import annotations

import pytest
from reflection_operator.settings import Settings, SettingsError


def test_unset_or_blank_variables_keep_the_defaults() -> None:
    assert Settings.from_env({}) == Settings.from_env({"REFLECTION_METRICS_PORT": "  "}) == Settings()


def test_variables_are_read_into_their_settings() -> None:
    settings = Settings.from_env(
        {
            "REFLECTION_NAMESPACES": "team-a, team-b,",
            "REFLECTION_IMPORTER_COMMAND": "python -m importer run --json",
            "REFLECTION_MIN_MEMORY_VOYAGE": "200Mi",
            "REFLECTION_RESYNC_SECONDS": "60",
        }
    )
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.importer_command == ("python", "-m", "importer", "run", "--json")
    assert settings.min_memory == {"fastembed": "256Mi", "voyage": "200Mi"}
    assert settings.resync_seconds == 60


def test_every_bad_variable_is_named_with_its_value() -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(
            {
                "REFLECTION_RUN_AS_USER": "-1",
                "REFLECTION_MIN_MEMORY_FASTEMBED": "lots",
                "REFLECTION_LIVENESS_PORT": "eighty",
            }
        )
    message = str(refused.value)
    for expected in (
        "REFLECTION_RUN_AS_USER='-1'",
        "REFLECTION_MIN_MEMORY_FASTEMBED='lots'",
        "REFLECTION_LIVENESS_PORT='eighty'",
    ):
        assert expected in message, message
