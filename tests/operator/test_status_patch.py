"""How the status is written: merge patches without empty strings, compared as the server stores them."""

from __future__ import annotations

from reflection_operator.controller import merge_patch_form, name_problems, stored_form


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
