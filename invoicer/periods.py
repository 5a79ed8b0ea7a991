"""Billing periods: half-open ranges of UTC instants, computed in an account's timezone.

An account's IANA timezone is used only here, to find where its periods begin and end; the
boundaries are then UTC instants and every duration is measured between UTC instants
(subtracting two aware datetimes that share a ``ZoneInfo`` gives wall-clock time, not
elapsed time, so nothing here ever does that).

Local midnight that does not exist (a DST gap at midnight, e.g. America/Santiago) starts the
day at the first instant of the new day, the transition itself; local midnight that occurs
twice (a DST fold, e.g. America/Havana on 2026-11-01) starts the day at its first occurrence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_MICROSECONDS_PER_SECOND = 1_000_000
_MIN_YEAR, _MAX_YEAR = 1900, 9998
_PERIOD_LABEL = re.compile(r"(?P<year>\d{4})-(?P<month>\d{2})")


class PeriodError(ValueError):
    """A period, period label or timezone that cannot be used."""


def _require_utc(name: str, instant: datetime) -> datetime:
    offset = instant.utcoffset()
    if offset is None:
        raise PeriodError(f"{name} {instant.isoformat()} is naive; expected a UTC instant")
    if offset != timedelta(0):
        raise PeriodError(f"{name} {instant.isoformat()} is not UTC (offset {offset})")
    return instant.astimezone(UTC)


def to_utc(name: str, instant: datetime) -> datetime:
    """``instant`` as a UTC datetime; naive datetimes are refused, other offsets converted."""
    if instant.utcoffset() is None:
        raise PeriodError(f"{name} {instant.isoformat()} is naive; expected an aware datetime")
    return instant.astimezone(UTC)


def duration_us(start: datetime, end: datetime) -> int:
    """Elapsed microseconds between two aware instants, measured in UTC."""
    delta = to_utc("end", end) - to_utc("start", start)
    return delta // timedelta(microseconds=1)


def zone(tz_name: str) -> ZoneInfo:
    """The IANA zone ``tz_name``, or a clear error."""
    try:
        return ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PeriodError(f"unknown IANA timezone {tz_name!r}") from None


@dataclass(frozen=True, slots=True)
class Period:
    """A billing period [start, end) of UTC instants, whole seconds.

    ``timezone`` is the IANA zone the period was computed in; it names the period (its local
    start date) and never enters a duration.
    """

    start: datetime
    end: datetime
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        start = _require_utc("period start", self.start)
        end = _require_utc("period end", self.end)
        if start.microsecond or end.microsecond:
            raise PeriodError(
                f"period [{start.isoformat()}, {end.isoformat()}) must start and end on whole "
                "seconds"
            )
        if not start < end:
            raise PeriodError(
                f"period [{start.isoformat()}, {end.isoformat()}) is empty or reversed"
            )
        zone(self.timezone)
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    @property
    def seconds(self) -> int:
        """Elapsed seconds (745 * 3600 for October 2026 in Europe/Berlin)."""
        return self.microseconds // _MICROSECONDS_PER_SECOND

    @property
    def microseconds(self) -> int:
        return duration_us(self.start, self.end)

    @property
    def local_start_date(self) -> date:
        """The calendar date the period starts on in its timezone (names the period)."""
        return self.start.astimezone(zone(self.timezone)).date()

    @property
    def local_end_date(self) -> date:
        """The calendar date of the (exclusive) end in the period's timezone."""
        return self.end.astimezone(zone(self.timezone)).date()

    def overlap_us(self, start: datetime, end: datetime | None) -> int:
        """Microseconds of [start, end) (end None = open-ended) inside the period."""
        clipped = self.clip(start, end)
        if clipped is None:
            return 0
        return duration_us(*clipped)

    def clip(self, start: datetime, end: datetime | None) -> tuple[datetime, datetime] | None:
        """[start, end) ∩ the period as UTC instants, or None when they do not overlap."""
        lo = max(self.start, to_utc("start", start))
        hi = self.end if end is None else min(self.end, to_utc("end", end))
        if lo >= hi:
            return None
        return lo, hi


def local_day_start(day: date, tz_name: str) -> datetime:
    """The UTC instant at which ``day`` begins in ``tz_name``.

    A local midnight in a DST gap does not exist: the day begins at the transition. A local
    midnight in a DST fold exists twice: the day begins at the first occurrence.
    """
    tz = zone(tz_name)
    wall = datetime(day.year, day.month, day.day, tzinfo=tz)
    first = wall.astimezone(UTC)  # fold=0: the first occurrence, or after a gap
    if first.astimezone(tz).replace(tzinfo=None) == wall.replace(tzinfo=None):
        return first
    # In a gap: fold=1 maps to an instant before the transition and fold=0 to one after it.
    # The day begins at the transition: the first second whose local date is ``day``.
    lo = wall.replace(fold=1).astimezone(UTC)  # local date is still the day before
    hi = first
    while hi - lo > timedelta(seconds=1):  # bounded: about 17 steps for a one-day gap
        mid = lo + (hi - lo) // 2
        mid = mid.replace(microsecond=0)
        if mid.astimezone(tz).date() >= day:
            hi = mid
        else:
            lo = mid
    return hi


def calendar_month(year: int, month: int, tz_name: str) -> Period:
    """The calendar month ``year-month`` in ``tz_name``: local midnight of the 1st to local
    midnight of the next 1st, as UTC instants."""
    if not 1 <= month <= 12:
        raise PeriodError(f"month {month} is out of range 1..12")
    if not _MIN_YEAR <= year <= _MAX_YEAR:
        raise PeriodError(f"year {year} is out of range {_MIN_YEAR}..{_MAX_YEAR}")
    next_year, next_month = (year + 1, 1) if month == 12 else (year, month + 1)
    return Period(
        start=local_day_start(date(year, month, 1), tz_name),
        end=local_day_start(date(next_year, next_month, 1), tz_name),
        timezone=tz_name,
    )


def parse_period_label(label: str) -> tuple[int, int]:
    """``"2026-10"`` -> ``(2026, 10)``; anything else is a clear error."""
    match = _PERIOD_LABEL.fullmatch(label)
    if match is None:
        raise PeriodError(
            f"period {label!r} is not a calendar month written YYYY-MM (e.g. 2026-10)"
        )
    year, month = int(match["year"]), int(match["month"])
    if not 1 <= month <= 12:
        raise PeriodError(f"period {label!r}: month {month:02d} is out of range 01..12")
    if not _MIN_YEAR <= year <= _MAX_YEAR:
        raise PeriodError(f"period {label!r}: year {year} is out of range {_MIN_YEAR}..{_MAX_YEAR}")
    return year, month


def format_instant(instant: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``: ``2026-09-30T22:00:00Z`` (microseconds only if any)."""
    text = to_utc("instant", instant).replace(tzinfo=None).isoformat()
    return f"{text}Z"
