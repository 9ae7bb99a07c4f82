"""The contract between the importer and the operator (importer/contract.py), checked from both sides."""

from __future__ import annotations

import json

import pytest
from reflection_operator.jobs import build_job
from reflection_operator.observed import state_summary
from reflection_operator.settings import Settings as OperatorSettings
from reflection_operator.spec import parse_spec

from importer import settings as importer_settings
from importer.contract import SUMMARY_KEY, ImporterEnv, RunNumbers, ShardSummary, summary_key

OPERATOR_SETTINGS = OperatorSettings(importer_model_dir="/models/minilm")
#: What the operator sets for the process and libraries, not for the importer's own settings.
PLATFORM_VARIABLES = {"MALLOC_ARENA_MAX", "HOME", "XDG_CACHE_HOME", "PYTHONUNBUFFERED"}


def test_every_importer_setting_has_its_variable_in_the_contract():
    for name in importer_settings._OPTIONS:
        assert importer_settings.env_name(name) == ImporterEnv.of(name).value


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "qdrant": {"url": "http://qdrant:6333", "apiKeySecretRef": {"name": "q", "key": "k"}},
            "embedding": {"provider": "voyage", "apiKeySecretRef": {"name": "v", "key": "k"}, "model": "voyage-3"},
            "tuning": {"settleSeconds": 5, "checkpointSeconds": 2},
        },
    ],
)
def test_every_variable_the_operator_sets_is_one_the_importer_reads(make_world, request_for, overrides):
    raw = make_world.base_spec(**overrides)
    spec, problems = parse_spec(raw, OPERATOR_SETTINGS)
    assert not problems and spec is not None
    job = build_job(spec, raw, request_for(), OPERATOR_SETTINGS)
    names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    read_by_importer = {member.value for member in ImporterEnv}
    assert names - PLATFORM_VARIABLES <= read_by_importer, names - PLATFORM_VARIABLES - read_by_importer
    assert ImporterEnv.SHARD_INDEX in names and ImporterEnv.STATE_CONFIGMAP in names


def test_the_summary_the_importer_writes_is_the_one_the_operator_reads():
    run = RunNumbers(files_read=3, files_unchanged=1, messages=20, chunks=6, skipped={"bad_json": 1}, seconds=2.5)
    written = ShardSummary(files_total=4, files_done=4, chunks=40, bytes=1000, phase="Succeeded", run=run)
    configmap = {"data": {SUMMARY_KEY: json.dumps({summary_key(2): written.to_json(), "junk": {}})}}
    assert state_summary(configmap) == {2: written}


def test_the_operator_skips_summary_entries_that_break_the_contract():
    entries = {"shard-0": {"files_total": "many"}, "shard-1": {"files_total": 3, "newer_field": 1}, "shard-x": {}}
    assert state_summary({"data": {SUMMARY_KEY: json.dumps(entries)}}) == {1: ShardSummary(files_total=3)}
    assert state_summary({"data": {SUMMARY_KEY: "not json"}}) == {}
