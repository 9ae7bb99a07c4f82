"""Spec parsing: defaults, and the checks the CRD schema cannot make, each naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from reflection_operator.quantity import CPU_PATTERN, MEMORY_PATTERN, format_memory, scale_memory
from reflection_operator.settings import Settings, SettingsError
from reflection_operator.spec import ImportRunSpec, parse_spec

CRD = Path(__file__).parents[2] / "charts/reflection-operator/crds/importruns.reflection.dev.yaml"
SETTINGS = Settings()


def problems_of(spec: dict) -> dict[str, str]:
    parsed, problems = parse_spec(spec, SETTINGS)
    assert (parsed is None) == bool(problems)
    return {p.field: p.reason for p in problems}


def test_defaults(make_world):
    spec, problems = parse_spec(make_world.base_spec(resources={}), SETTINGS)
    assert not problems and spec is not None
    assert spec.embedding.provider == "fastembed"
    assert spec.schedule is None and spec.concurrency_policy == "Forbid" and not spec.suspend
    assert (spec.resources.memory, spec.resources.cpu) == (1 << 30, "1")  # from the operator's settings
    assert (spec.memory_retry.factor, spec.memory_retry.max_memory, spec.memory_retry.max_attempts) == (1.5, 2 << 30, 3)
    assert (spec.failure_retry.max_retries, spec.failure_retry.backoff_seconds) == (2, 10)
    assert (spec.successful_runs_history_limit, spec.failed_runs_history_limit) == (3, 1)
    assert (spec.tuning.batch_size, spec.tuning.thread_pool_workers, spec.tuning.chunk_messages) == (2, 2, 5)
    assert spec.parallelism == 1 and spec.image == SETTINGS.importer_image
    assert spec.source.sub_path == "projects"
    assert spec.claim_refs() == [("spec.source.volume.persistentVolumeClaim.claimName", "claude-logs")]


@pytest.mark.parametrize(
    ("override", "field", "reason"),
    [
        ({"schedule": "61 * * * *"}, "spec.schedule", "InvalidSchedule"),
        ({"schedule": "*/61 * * * *"}, "spec.schedule", "InvalidSchedule"),
        ({"schedule": "0 */25 * * *"}, "spec.schedule", "InvalidSchedule"),
        ({"schedule": "*/90 * * * * *"}, "spec.schedule", "InvalidSchedule"),
        ({"schedule": "* * *"}, "spec.schedule", "InvalidSchedule"),
        ({"schedule": "0 3 * * *", "timeZone": "Mars/Olympus"}, "spec.timeZone", "UnknownTimeZone"),
        ({"resources": {"memory": "64Mi"}}, "spec.resources.memory", "MemoryTooLow"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory", "InvalidSpec"),
        ({"memoryRetry": {"maxMemory": "256Mi"}}, "spec.memoryRetry.maxMemory", "InvalidSpec"),
        ({"embedding": {"provider": "voyage"}}, "spec.embedding.apiKeySecretRef", "InvalidSpec"),
        ({"qdrant": {"url": "http://q:6333", "path": "store"}}, "spec.qdrant", "InvalidSpec"),
        ({"qdrant": {"path": "store"}}, "spec.qdrant.volume", "InvalidSpec"),
        ({"qdrant": {}}, "spec.qdrant", "InvalidSpec"),
        (
            {"source": {"volume": {"persistentVolumeClaim": {"claimName": "x"}}, "subPath": "../etc"}},
            "spec.source.subPath",
            "InvalidSpec",
        ),
        ({"source": {}}, "spec.source.volume", "InvalidSpec"),
        ({"source": {"volume": {"persistentVolume": {"claimName": "x"}}}}, "spec.source.volume", "InvalidSpec"),
        ({"concurrencyPolicy": "Allow"}, "spec.concurrencyPolicy", "InvalidSpec"),
        ({"parallelism": 0}, "spec.parallelism", "InvalidSpec"),
    ],
)
def test_problems_name_their_field(make_world, override, field, reason):
    found = problems_of(make_world.base_spec(**override))
    assert found.get(field) == reason, found


def test_all_problems_are_reported_together(make_world):
    found = problems_of(make_world.base_spec(schedule="nope", timeZone="Nowhere/Land", parallelism=0))
    assert set(found) == {"spec.schedule", "spec.timeZone", "spec.parallelism"}


def test_embedded_qdrant_and_voyage_are_valid(make_world):
    spec, problems = parse_spec(
        make_world.base_spec(
            qdrant={"path": "store", "volume": {"persistentVolumeClaim": {"claimName": "qdrant-data"}}},
            embedding={"provider": "voyage", "apiKeySecretRef": {"name": "voyage", "key": "api-key"}},
            resources={"memory": "128Mi"},
        ),
        SETTINGS,
    )
    assert not problems and spec is not None
    assert spec.qdrant.path == "store" and spec.qdrant.url is None
    assert [f for f, _ in spec.secret_refs()] == ["spec.embedding.apiKeySecretRef"]
    assert [c for _, c in spec.claim_refs()] == ["claude-logs", "qdrant-data"]


def test_memory_scaling_rounds_up_to_whole_mebibytes_and_stops_at_the_ceiling():
    assert scale_memory(150 << 20, 1.5, 2 << 30) == 225 << 20
    assert scale_memory(101 << 20, 1.5, 2 << 30) == 152 << 20  # 151.5 -> 152
    assert scale_memory(1536 << 20, 1.5, 2 << 30) == 2 << 30
    assert format_memory(2 << 30) == "2Gi" and format_memory(1536 << 20) == "1536Mi"


def test_settings_from_the_environment():
    settings = Settings.from_env(
        {"REFLECTION_NAMESPACES": "a, b", "REFLECTION_DEFAULT_MEMORY": "1Gi", "REFLECTION_METRICS_PORT": "0"}
    )
    assert settings.namespaces == ("a", "b") and settings.default_memory == "1Gi" and settings.metrics_port == 0
    with pytest.raises(SettingsError, match="REFLECTION_DEFAULT_MEMORY"):
        Settings.from_env({"REFLECTION_DEFAULT_MEMORY": "much"})
    with pytest.raises(SettingsError, match="REFLECTION_METRICS_PORT"):
        Settings.from_env({"REFLECTION_METRICS_PORT": "x"})


# -- the CRD and the code agree -----------------------------------------------------------------------


def crd_spec_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def test_the_crd_quantity_patterns_are_the_codes():
    schema = crd_spec_schema()
    assert schema["resources"]["properties"]["memory"]["pattern"] == MEMORY_PATTERN
    assert schema["memoryRetry"]["properties"]["maxMemory"]["pattern"] == MEMORY_PATTERN
    assert schema["resources"]["properties"]["cpu"]["pattern"] == CPU_PATTERN


def test_the_crd_defaults_are_the_codes(make_world):
    """A spec defaulted by the API server parses to the same thing as one defaulted by the parser."""
    schema = crd_spec_schema()

    def defaults(properties: dict) -> dict:
        found = {}
        for name, prop in properties.items():
            if "default" in prop:
                found[name] = prop["default"]
            if prop.get("type") == "object" and "properties" in prop and "default" in prop:
                found[name] = {**prop["default"], **defaults(prop["properties"])}
        return found

    by_server = {**defaults(schema), **make_world.base_spec()}
    by_parser, problems = parse_spec(make_world.base_spec(), SETTINGS)
    assert not problems
    assert parse_spec(by_server, SETTINGS)[0] == by_parser


#: Optional in the CRD, filled in from the operator's settings before the models read the spec.
FILLED_BY_THE_OPERATOR = {"spec.resources", "spec.resources.memory", "spec.resources.cpu", "spec.image"}
#: Keywords that mean the same in the CRD (OpenAPI v3.0) and in pydantic's JSON Schema.
COMPARED = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "pattern", "minLength", "maxLength")
COMPARED_OBJECT = ("minProperties", "maxProperties")


def _resolve(schema: dict, defs: dict) -> dict:
    """The schema a model field stands for: references followed, ``X | None`` read as X."""
    if "$ref" in schema:
        return _resolve(defs[schema["$ref"].rsplit("/", 1)[-1]], defs) | {
            k: v for k, v in schema.items() if k != "$ref"
        }
    options = [option for option in schema.get("anyOf", []) if option.get("type") != "null"]
    if len(options) == 1:
        return _resolve(options[0], defs) | {k: v for k, v in schema.items() if k != "anyOf"}
    return schema


def _openapi_v3_0(schema: dict) -> dict:
    """The CRD's ``minimum: x, exclusiveMinimum: true`` as JSON Schema's ``exclusiveMinimum: x``."""
    if schema.get("exclusiveMinimum") is True:
        return {k: v for k, v in schema.items() if k != "minimum"} | {"exclusiveMinimum": schema["minimum"]}
    return schema


def _drift(crd: dict, model: dict, defs: dict, path: str) -> list[str]:
    crd, model = _openapi_v3_0(crd), _resolve(model, defs)
    found = [
        f"{path}: {keyword} is {crd.get(keyword)!r} in the CRD, {model.get(keyword)!r} in the model"
        for keyword in COMPARED + (COMPARED_OBJECT if crd.get("type") == "object" else ())
        if crd.get(keyword) != model.get(keyword)
    ]
    crd_default, model_default = crd.get("default"), model.get("default")
    # Object defaults ({}) are the API server's way to default the fields inside; test_the_crd_defaults_are_the_codes
    # checks those. A model default of None or "" means the same as no default.
    given = crd_default is not None or model_default not in (None, "")
    if given and not isinstance(crd_default, dict) and crd_default != model_default:
        found.append(f"{path}: default is {crd_default!r} in the CRD, {model_default!r} in the model")
    crd_properties, model_properties = crd.get("properties", {}), model.get("properties", {})
    if set(crd_properties) != set(model_properties):
        found.append(f"{path}: fields {sorted(crd_properties)} in the CRD, {sorted(model_properties)} in the model")
    required = {f"{path}.{name}" for name in model.get("required", [])} - FILLED_BY_THE_OPERATOR
    if required != {f"{path}.{name}" for name in crd.get("required", [])}:
        found.append(f"{path}: required {crd.get('required')} in the CRD, {model.get('required')} in the model")
    for name in set(crd_properties) & set(model_properties):
        found.extend(_drift(crd_properties[name], model_properties[name], defs, f"{path}.{name}"))
    return found


def test_the_crd_schema_and_the_spec_models_agree():
    """The CRD's openAPIV3Schema and the pydantic models are two descriptions of one spec: they must not drift."""
    crd = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    model = ImportRunSpec.model_json_schema(by_alias=True)
    assert _drift(crd, model, model.get("$defs", {}), "spec") == []


def test_the_drift_check_notices_a_changed_bound():
    crd = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    crd["properties"]["parallelism"]["maximum"] = 65
    del crd["properties"]["tuning"]["properties"]["batchSize"]
    model = ImportRunSpec.model_json_schema(by_alias=True)
    found = _drift(crd, model, model.get("$defs", {}), "spec")
    assert "spec.parallelism: maximum is 65 in the CRD, 64 in the model" in found
    assert [line for line in found if line.startswith("spec.tuning: fields")], found
    assert len(found) == 2, found
