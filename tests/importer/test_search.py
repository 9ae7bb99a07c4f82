"""``python -m importer search`` against a store the real importer wrote: JSON hits, hits grouped by session,
filters; the messages around a hit read back from the session file."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from importer.search import (
    Hit,
    SearchFilter,
    matches,
    messages_around,
    parse_half_life,
    parse_since,
    prefer_recent,
    session_of,
    split_messages,
)
from importer.settings import Settings, SettingsError

REPO = Path(__file__).resolve().parents[2]


def _search(store: Any, *args: str) -> str:
    command = [sys.executable, "-m", "importer", "search", *args, *store.args()]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _json_hits(store: Any, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _search(store, *args, "--json").splitlines()]


def test_json_prints_one_object_per_hit_with_the_session_file_and_its_messages(searchable_store: Any) -> None:
    hits = _json_hits(searchable_store, "why did my dough stay flat", "--limit", "3")
    assert 1 <= len(hits) <= 3
    best = hits[0]
    assert best["session_file"] == "-home-ann-bakery/s1.jsonl" and best["project"] == "bakery"
    assert best["chunk_index"] == 0 and best["timestamp"].startswith("2025-01-10T09:00")
    assert [m["role"] for m in best["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert best["messages"][0]["text"].startswith("Why is my bread dough not rising?")
    assert best["text"].startswith("User: Why is my bread dough")
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_a_sub_agent_counts_as_its_parent_session_in_the_grouped_output(searchable_store: Any) -> None:
    out = _search(searchable_store, "baking bread: yeast, kneading, oven temperature", "--limit", "5")
    hits = _json_hits(searchable_store, "baking bread: yeast, kneading, oven temperature", "--limit", "20")
    assert "-home-ann-bakery/s1/subagents/agent-a1.jsonl" in {h["session_file"] for h in hits}  # really a hit
    entries = [line for line in out.splitlines() if line[:1].isdigit()]
    assert len(entries) == 2  # the bakery session (three chunks, one of its sub-agent) and the infra one
    assert "-home-ann-bakery/s1.jsonl, 2 more hits" in entries[0] and "bakery" in entries[0]
    assert "-home-bob-infra/s2.jsonl" in entries[1]


def test_the_grouped_output_shows_the_message_after_the_best_moment(searchable_store: Any) -> None:
    lines = _search(searchable_store, "why did my dough stay flat", "--limit", "1").splitlines()
    assert lines[0].startswith("1. ") and "bakery  2025-01-10T09:00:00Z  -home-ann-bakery/s1.jsonl" in lines[0]
    assert lines[1].startswith("   #0: User: Why is my bread dough not rising?")
    # The chunk holds the session's first five messages: nothing before it, the sixth after it.
    assert lines[2] == "   after:  assistant: Knead about ten minutes, until the dough passes the windowpane test."
    assert len(lines) == 3


def test_filters_by_time_project_and_role(searchable_store: Any) -> None:
    query = "why did my dough stay flat"
    assert _json_hits(searchable_store, query)[0]["project"] == "bakery"
    recent = _json_hits(searchable_store, query, "--since", "2w")
    assert recent and {h["project"] for h in recent} == {"infra"}
    assert {h["project"] for h in _json_hits(searchable_store, query, "--project", "infra")} == {"infra"}
    old_enough = _json_hits(searchable_store, query, "--since", "2025-01-10", "--limit", "10")
    assert {h["project"] for h in old_enough} == {"bakery", "infra"}
    for role in ("user", "assistant"):
        found = _json_hits(searchable_store, "bread", "--role", role, "--limit", "10")
        assert found and all(role in {m["role"] for m in h["messages"]} for h in found)
    # The bakery's last chunk holds two messages, an assistant's and a user's; the agent's a user's first.
    assert {h["chunk_index"] for h in _json_hits(searchable_store, "bread", "--role", "user", "--limit", "10")} >= {
        0,
        1,
    }


def test_a_preference_for_recent_moments_is_off_unless_asked(searchable_store: Any) -> None:
    query = "why did my dough stay flat"
    assert _json_hits(searchable_store, query)[0]["project"] == "bakery"  # the best match, from 2025
    recent = _json_hits(searchable_store, query, "--prefer-recent", "7d", "--limit", "10")
    assert recent[0]["project"] == "infra"  # from this week: the old bakery's scores are halved ~100 times
    assert {h["project"] for h in recent} == {"bakery", "infra"}  # re-ranked, not filtered
    assert [h["score"] for h in recent] == sorted((h["score"] for h in recent), reverse=True)
    refused = subprocess.run(
        [sys.executable, "-m", "importer", "search", query, "--prefer-recent", "lately", *searchable_store.args()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0 and "--prefer-recent 'lately'" in refused.stderr


def test_prefer_recent_halves_a_score_each_half_life() -> None:
    now = datetime(2026, 3, 1, tzinfo=UTC)

    def hit(score: float, timestamp: str) -> Hit:
        return Hit(score, "p", timestamp, "p/s.jsonl", 0, "", text="User: x")

    old, new, undated = hit(0.5, "2026-01-30T00:00:00Z"), hit(0.3, "2026-02-28T00:00:00Z"), hit(0.9, "")
    ranked = prefer_recent([old, undated, new], parse_half_life("30d"), now)
    assert [h.timestamp for h in ranked] == [new.timestamp, old.timestamp, ""]
    assert [h.score for h in ranked] == pytest.approx([0.3 * 0.5 ** (1 / 30), 0.5 * 0.5 ** (30 / 30), 0.0])
    assert old.score == 0.5  # the hits given are not changed
    assert prefer_recent([hit(0.5, "2026-03-02T00:00:00Z")], timedelta(days=1), now)[0].score == 0.5  # future: now
    for bad in ("0d", "soon", ""):
        with pytest.raises(SettingsError):
            parse_half_life(bad)


def test_messages_around_a_hit_come_from_the_session_file(searchable_store: Any) -> None:
    settings = Settings(source=searchable_store.source)
    found = messages_around(settings, "-home-ann-bakery/s1.jsonl", 1, around=2)
    assert [m.text[:20] for m in found] == [
        "Yes. Let the water c",
        "Should I knead it lo",
        "Knead about ten minu",
        "Thanks, the second l",
    ]
    assert [m.in_hit for m in found] == [False, False, True, True]
    assert found[2].role == "assistant" and found[2].timestamp == "2025-01-10T09:05:00Z"
    with pytest.raises(LookupError):
        messages_around(settings, "-home-ann-bakery/s1.jsonl", 7, around=2)
    with pytest.raises(LookupError):
        messages_around(settings, "../../etc/passwd", 0, around=2)


def test_split_messages_reads_back_the_chunkers_labels() -> None:
    text = "User: first line\n\nstill the first\n\nAssistant: an answer\n\nUser: again"
    assert split_messages(text) == [
        {"role": "user", "text": "first line\n\nstill the first"},
        {"role": "assistant", "text": "an answer"},
        {"role": "user", "text": "again"},
    ]
    # A later piece of a long message has no label: it is the chunk's first role.
    assert split_messages("rest of a long answer", "assistant") == [
        {"role": "assistant", "text": "rest of a long answer"}
    ]


def test_since_takes_durations_and_dates() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_since("2w", now) == now - timedelta(days=14)
    assert parse_since("12h", now) == now - timedelta(hours=12)
    assert parse_since("2026-01-31", now) == datetime(2026, 1, 31, tzinfo=UTC)
    assert parse_since("2026-01-31T08:00:00+01:00", now) == datetime(2026, 1, 31, 7, tzinfo=UTC)
    with pytest.raises(SettingsError):
        parse_since("last tuesday", now)


def test_session_of_maps_sub_agents_to_their_parent() -> None:
    assert session_of("p/abc/subagents/agent-1.jsonl") == "p/abc.jsonl"
    assert session_of("p/abc.jsonl") == "p/abc.jsonl"


def test_role_and_time_filters_on_single_hits() -> None:
    def hit(text: str, timestamp: str, start_role: str = "user") -> Hit:
        return Hit(0.5, "p", timestamp, "p/s.jsonl", 0, text[:200], text=text, start_role=start_role)

    asked = hit("User: only a question", "2026-02-01T10:00:00Z")
    both = hit("User: a question\n\nAssistant: an answer", "2026-02-01T10:00:00Z")
    piece = hit("the rest of a long answer", "2026-02-01T10:00:00Z", start_role="assistant")
    assert not matches(asked, SearchFilter(role="assistant")) and matches(both, SearchFilter(role="assistant"))
    assert matches(piece, SearchFilter(role="assistant")) and not matches(piece, SearchFilter(role="user"))
    since = datetime(2026, 2, 1, 10, 0, 1, tzinfo=UTC)
    assert not matches(asked, SearchFilter(since=since))
    assert matches(asked, SearchFilter(since=since - timedelta(seconds=1)))
    assert not matches(hit("User: x", ""), SearchFilter(since=since))  # no time: not shown to be recent
