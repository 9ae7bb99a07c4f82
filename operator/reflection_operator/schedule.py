"""Cron schedules in a time zone, and the decision whether a scheduled run is due, late or skipped.

Expressions have five fields (minute hour day month weekday), six fields with seconds first
("*/10 * * * * *" = every ten seconds: tests use it so that a schedule fires within seconds), or a
macro such as "@hourly". croniter does the calendar arithmetic; times are aware datetimes in UTC at the
edges and in the schedule's zone inside, so DST shifts follow the zone's rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

#: How many missed times are counted (and reported) at most after a long outage.
MAX_MISSED_COUNTED = 100

#: Each field's name and its lowest and highest value, in the order of a five-field expression (the
#: seconds of a six-field one come first). Day of week runs to 7: croniter reads 7 as Sunday, like 0.
FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
SECONDS_FIELD = ("second", 0, 59)
#: Day of week has seven distinct days although it accepts eight numbers.
DISTINCT_VALUES = {"day of week": 7}


class ScheduleError(ValueError):
    """An unusable schedule; ``field`` names the spec field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CronSchedule:
    expression: str
    zone: ZoneInfo
    seconds_first: bool

    @classmethod
    def parse(cls, expression: str, time_zone: str | None = None) -> CronSchedule:
        zone = parse_zone(time_zone)
        text = " ".join(expression.split())
        fields = text.split(" ")
        if not text.startswith("@") and len(fields) not in (5, 6):
            raise ScheduleError(
                "spec.schedule",
                f"{expression!r} has {len(fields)} fields; expected 5 (minute hour day month weekday) "
                "or 6 (with seconds first)",
            )
        seconds_first = len(fields) == 6
        try:
            # strict: a day that no month named has (30 February) is refused, not searched for forever.
            valid = croniter.is_valid(text, second_at_beginning=seconds_first, strict=True)
        except CroniterError:
            valid = False
        if not valid:
            raise ScheduleError("spec.schedule", f"{expression!r} is not a valid cron expression")
        if not text.startswith("@"):
            _check_steps(expression, fields, seconds_first)
        return cls(text, zone, seconds_first)

    def _iterator(self, start: datetime, *, backwards: bool = False) -> croniter:
        return croniter(
            self.expression,
            start.astimezone(self.zone),
            is_prev=backwards,
            second_at_beginning=self.seconds_first,
        )

    def next_after(self, moment: datetime) -> datetime:
        """The first scheduled time strictly after ``moment`` (in UTC)."""
        found: datetime = self._iterator(moment).get_next(datetime)
        return found.astimezone(UTC)

    def latest_at_or_before(self, moment: datetime) -> datetime:
        """The last scheduled time at or before ``moment`` (in UTC)."""
        # croniter's get_prev is strict; nudging the start by a microsecond makes ``moment`` itself count.
        found: datetime = self._iterator(moment + timedelta(microseconds=1), backwards=True).get_prev(datetime)
        return found.astimezone(UTC)

    def count_between(self, after: datetime, before: datetime, limit: int = MAX_MISSED_COUNTED) -> int:
        """How many scheduled times lie strictly between ``after`` and ``before`` (at most ``limit``)."""
        iterator = self._iterator(after)
        count = 0
        while count < limit:
            found: datetime = iterator.get_next(datetime)
            if found >= before:
                break
            count += 1
        return count


def _check_steps(expression: str, fields: list[str], seconds_first: bool) -> None:
    """croniter checks values and ranges against each field's bounds but not steps: "*/61" in the minute
    field would pass and fire at minute 0 only. A step longer than its field's values is refused."""
    layout = ((SECONDS_FIELD,) if seconds_first else ()) + FIELDS
    for (name, low, high), text in zip(layout, fields, strict=True):
        values = DISTINCT_VALUES.get(name, high - low + 1)
        for part in text.split(","):
            _, slash, step = part.partition("/")
            if slash and not (step.isdigit() and 1 <= int(step) <= values):
                raise ScheduleError(
                    "spec.schedule",
                    f"{expression!r}: the step {step!r} of the {name} field must be between 1 and {values} "
                    f"(the field has {values} values, {low}-{high})",
                )


def parse_zone(time_zone: str | None) -> ZoneInfo:
    if not time_zone:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ScheduleError("spec.timeZone", f"{time_zone!r} is not a known IANA time zone") from error


@dataclass(frozen=True)
class Tick:
    """What the schedule asks for now."""

    #: The scheduled time to act on now (start, skip or report as missed), or None when nothing is due.
    due: datetime | None
    #: Due but older than startingDeadlineSeconds: skip it (with an Event) instead of starting it.
    too_late: bool
    #: Scheduled times between the last handled one and ``due`` that nobody will ever start.
    missed: int
    #: The next scheduled time after now (or after ``due``), for status.nextScheduleTime.
    next_time: datetime


def evaluate(
    schedule: CronSchedule,
    last_handled: datetime,
    now: datetime,
    starting_deadline_seconds: int | None,
) -> Tick:
    """Like CronJob: of all times missed since ``last_handled`` only the latest is considered; it starts if
    it is within the starting deadline, else it is skipped. Earlier ones are counted as missed."""
    next_time = schedule.next_after(now)
    latest = schedule.latest_at_or_before(now)
    if latest <= last_handled:
        return Tick(due=None, too_late=False, missed=0, next_time=next_time)
    missed = schedule.count_between(last_handled, latest)
    too_late = starting_deadline_seconds is not None and (now - latest).total_seconds() > starting_deadline_seconds
    return Tick(due=latest, too_late=too_late, missed=missed, next_time=next_time)
