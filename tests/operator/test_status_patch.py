"""How the status is written: merge patches without empty strings, compared as the server stores them."""

from __future__ import annotations

from typing import Any

from reflection_operator.controller import merge_patch_form, name_problems, stored_form
from reflection_operator.progress import Progress

from importer.contract import RunNumbers


def test_empty_strings_are_deleted_at_the_top_and_dropped_inside_lists():
    status = {
        "memory": "",
        "phase": "Running",
        "run": {"memory": "", "attempt": 2},
        "conditions": [{"type": "Ready", "status": "True", "message": ""}],
        "completionTime": None,
    }
    assert merge_patch_form(status) == {
        "memory": None,
        "phase": "Running",
        "run": {"memory": None, "attempt": 2},
        "conditions": [{"type": "Ready", "status": "True"}],
        "completionTime": None,
    }
    assert stored_form(status) == {
        "phase": "Running",
        "run": {"attempt": 2},
        "conditions": [{"type": "Ready", "status": "True"}],
    }


def test_names_too_long_for_labels_are_a_problem():
    assert name_problems("a" * 63) == []
    (problem,) = name_problems("a" * 64)
    assert problem.field == "metadata.name" and problem.reason == "InvalidName"


def _merge(stored: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies it to the status."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(stored) if isinstance(stored, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge(merged.get(key), value)
    return merged


def test_a_runs_numbers_replace_the_last_runs_in_the_stored_status():
    """Reasons for skipped lines the last run had and this one has not must not linger."""
    last = Progress(run=RunNumbers(files_read=3, skipped={"bad_json": 2, "too_long": 1}))
    this = Progress(run=RunNumbers(files_unchanged=3, skipped={"non_utf8": 1}))
    stored = stored_form(merge_patch_form({"progress": "3/3", **last.status_fields(True)}))
    wanted = {"progress": "3/3", **this.status_fields(True)}
    assert _merge(stored, merge_patch_form(wanted)) == stored_form(wanted)
