"""Cron schedules in time zones, and when a scheduled run is due, late or missed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from reflection_operator.schedule import CronSchedule, ScheduleError, evaluate

NOON = datetime(2026, 3, 28, 12, 0, 0, tzinfo=UTC)


def test_seconds_first_six_field_expressions():
    every_ten = CronSchedule.parse("*/10 * * * * *")
    assert every_ten.next_after(NOON) == NOON + timedelta(seconds=10)
    assert every_ten.latest_at_or_before(NOON) == NOON
    assert every_ten.latest_at_or_before(NOON + timedelta(seconds=9)) == NOON


def test_time_zones_and_daylight_saving():
    berlin = CronSchedule.parse("30 2 * * *", "Europe/Berlin")
    # 2:30 does not exist on the night clocks go forward (29 March 2026); the run moves to 3:00 CEST.
    first = berlin.next_after(NOON)
    assert first == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert berlin.next_after(first) == datetime(2026, 3, 30, 0, 30, tzinfo=UTC)
    # New York is already on summer time (since 8 March): 9:00 EDT is 13:00 UTC, the same day.
    new_york = CronSchedule.parse("0 9 * * *", "America/New_York")
    assert new_york.next_after(NOON) == datetime(2026, 3, 28, 13, 0, tzinfo=UTC)


@pytest.mark.parametrize("expression", ["61 * * * *", "* * *", "a b c d e", "* * * * * * *", ""])
def test_bad_expressions_name_spec_schedule(expression):
    with pytest.raises(ScheduleError) as raised:
        CronSchedule.parse(expression)
    assert raised.value.field == "spec.schedule"


def test_unknown_zone_names_spec_time_zone():
    with pytest.raises(ScheduleError) as raised:
        CronSchedule.parse("@hourly", "Europe/Atlantis")
    assert raised.value.field == "spec.timeZone"


def test_nothing_due_before_the_first_time():
    schedule = CronSchedule.parse("0 * * * *")
    tick = evaluate(schedule, NOON, NOON + timedelta(minutes=59), None)
    assert tick.due is None and tick.next_time == NOON + timedelta(hours=1)


def test_only_the_latest_missed_time_is_due_and_the_rest_are_counted():
    schedule = CronSchedule.parse("0 * * * *")
    tick = evaluate(schedule, NOON, NOON + timedelta(hours=5, minutes=1), starting_deadline_seconds=None)
    assert tick.due == NOON + timedelta(hours=5)
    assert tick.missed == 4 and not tick.too_late


def test_a_due_time_past_the_starting_deadline_is_too_late():
    schedule = CronSchedule.parse("0 * * * *")
    tick = evaluate(schedule, NOON, NOON + timedelta(hours=1, seconds=301), starting_deadline_seconds=300)
    assert tick.due == NOON + timedelta(hours=1) and tick.too_late
    assert not evaluate(schedule, NOON, NOON + timedelta(hours=1, seconds=299), 300).too_late


def test_a_handled_time_is_not_due_again():
    schedule = CronSchedule.parse("*/10 * * * * *")
    assert evaluate(schedule, NOON, NOON + timedelta(seconds=5), None).due is None


def _layouts() -> list[tuple[str, int, int, int, int]]:
    """(field name, position, field count, lowest, highest) for every field of both expression forms."""
    from reflection_operator.schedule import FIELDS, SECONDS_FIELD

    five = [(name, i, 5, low, high) for i, (name, low, high) in enumerate(FIELDS)]
    six = [(name, i, 6, low, high) for i, (name, low, high) in enumerate((SECONDS_FIELD, *FIELDS))]
    return five + six


def _with_field(position: int, count: int, text: str) -> str:
    fields = ["*"] * count
    fields[position] = text
    return " ".join(fields)


@pytest.mark.parametrize(("name", "position", "count", "low", "high"), _layouts())
def test_every_field_is_checked_against_its_bounds(name, position, count, low, high):
    """Values, ranges and steps one past each field's bounds are refused; the bounds themselves pass."""
    distinct = 7 if name == "day of week" else high - low + 1
    accepted = [str(low), str(high), f"{low}-{high}", f"*/{distinct}", f"{low}-{high}/{distinct}", "*/1"]
    refused = [str(low - 1), str(high + 1), f"{low}-{high + 1}", f"*/{distinct + 1}", f"{low}/{distinct + 1}"]
    refused += ["*/0", f"{low}-{high}/{distinct + 1}", "*/x", f"{low},*/{distinct + 30}"]
    for text in accepted:
        CronSchedule.parse(_with_field(position, count, text))
    for text in refused:
        expression = _with_field(position, count, text)
        with pytest.raises(ScheduleError) as raised:
            CronSchedule.parse(expression)
        assert raised.value.field == "spec.schedule", expression


@pytest.mark.parametrize("expression", ["*/61 * * * *", "0 */25 * * *", "*/90 * * * * *", "0 0 30 2 *"])
def test_steps_past_the_field_and_impossible_days_are_refused(expression):
    with pytest.raises(ScheduleError) as raised:
        CronSchedule.parse(expression)
    assert raised.value.field == "spec.schedule"
    assert expression in str(raised.value)
