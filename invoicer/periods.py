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

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rating.catalog import Account, BillingPeriod, PeriodPolicy, TimezoneChange

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
    if instant.tzinfo is UTC:  # the common case, and astimezone would return it as is
        return instant
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


@lru_cache(maxsize=8192)  # every line of a period repeats the same few instants
def format_instant(instant: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``: ``2026-09-30T22:00:00Z`` (microseconds only if any)."""
    text = to_utc("instant", instant).replace(tzinfo=None).isoformat()
    return f"{text}Z"


# -- billing-period policies (BILLING-SEMANTICS §2) -------------------------------------------
#
# Every policy gives each calendar month (y, m) one *boundary*: a local date at whose midnight
# a period starts. Boundaries increase strictly from month to month, so consecutive
# boundaries tile time. A period is *labelled* by the month that holds its last local day
# (``--period 2026-10`` closes the period whose last day is in October): exactly one period
# per month for every policy, and the calendar month keeps its own name.


def _last_day(year: int, month: int) -> int:
    return calendar.monthrange(year, month)[1]


def _add_months(year: int, month: int, delta: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + delta
    return index // 12, index % 12 + 1


def month_boundary(policy: BillingPeriod, year: int, month: int) -> date:
    """The local date a period starts on, the one boundary ``policy`` puts in (or right
    after) month ``year-month``. Days beyond a month's length clamp to its last day."""
    last = _last_day(year, month)
    if policy.policy is PeriodPolicy.CALENDAR_MONTH:
        return date(year, month, 1)
    if policy.policy is PeriodPolicy.MONTH_END_DAY:
        if policy.day is None:
            raise PeriodError("month_end_day policy without a day")
        return date(year, month, min(policy.day, last)) + timedelta(days=1)
    if policy.policy is PeriodPolicy.DAYS_BEFORE_MONTH_END:
        if policy.days is None:
            raise PeriodError("days_before_month_end policy without days")
        return date(year, month, last) - timedelta(days=policy.days - 1)
    if policy.policy is PeriodPolicy.ANNIVERSARY:
        if policy.anchor is None:
            raise PeriodError(
                "anniversary policy without an anchor (no subscription and no explicit anchor)"
            )
        return date(year, month, min(policy.anchor.day, last))
    raise PeriodError(f"unknown billing-period policy {policy.policy!r}")


def _boundary_index_of_label(policy: BillingPeriod, year: int, month: int) -> tuple[int, int]:
    """The month whose boundary *ends* the period labelled ``year-month``."""
    for candidate in ((year, month), _add_months(year, month, 1)):
        last_day = month_boundary(policy, *candidate) - timedelta(days=1)
        if (last_day.year, last_day.month) == (year, month):
            return candidate
    raise PeriodError(f"no period of policy {policy.policy.value} ends in {year:04d}-{month:02d}")


@dataclass(frozen=True, slots=True)
class BillingSchedule:
    """An account's periods: its policy and its timezone history.

    A timezone change takes effect from the period labelled ``year-month``: each period's
    *end* is computed in the timezone of its own label and its *start* is the previous
    period's end, so the tiling never has a gap or an overlap across a change.
    """

    policy: BillingPeriod
    timezone: str
    changes: tuple[TimezoneChange, ...] = ()

    @classmethod
    def of(cls, account: Account) -> BillingSchedule:
        """The account's schedule. An anniversary account with neither an anchor nor a
        subscription (nothing to bill) is given calendar months."""
        policy = account.billing_period
        if policy.policy is PeriodPolicy.ANNIVERSARY and policy.anchor is None:
            policy = BillingPeriod()
        return cls(policy, account.timezone, account.timezone_changes)

    def timezone_of(self, year: int, month: int) -> str:
        tz = self.timezone
        for change in sorted(self.changes, key=lambda c: (c.year, c.month)):
            if (change.year, change.month) <= (year, month):
                tz = change.timezone
        return tz

    def _end(self, year: int, month: int) -> datetime:
        boundary = _boundary_index_of_label(self.policy, year, month)
        return local_day_start(
            month_boundary(self.policy, *boundary), self.timezone_of(year, month)
        )

    def period(self, year: int, month: int) -> Period:
        """The period labelled ``year-month`` (the one whose last local day is in it)."""
        if not 1 <= month <= 12:
            raise PeriodError(f"month {month} is out of range 1..12")
        if not _MIN_YEAR < year < _MAX_YEAR:
            raise PeriodError(f"year {year} is out of range {_MIN_YEAR + 1}..{_MAX_YEAR - 1}")
        start = self._end(*_add_months(year, month, -1))
        return Period(start, self._end(year, month), self.timezone_of(year, month))

    def label_of(self, instant: datetime) -> tuple[int, int]:
        """The label of the period containing ``instant``."""
        instant = to_utc("instant", instant)
        year, month = instant.year, instant.month
        for delta in (-1, 0, 1, 2):
            label = _add_months(year, month, delta)
            period = self.period(*label)
            if period.start <= instant < period.end:
                return label
        raise PeriodError(f"no period contains {format_instant(instant)}")  # pragma: no cover

    def containing(self, instant: datetime) -> Period:
        """The period containing ``instant`` (half-open: an end belongs to the next one)."""
        return self.period(*self.label_of(instant))

    def tiling(self, start: datetime, end: datetime) -> list[Period]:
        """The consecutive periods covering [start, end), in order."""
        start, end = to_utc("start", start), to_utc("end", end)
        if not start < end:
            return []
        label = self.label_of(start)
        periods: list[Period] = []
        while True:
            period = self.period(*label)
            periods.append(period)
            if period.end >= end:
                return periods
            label = _add_months(*label, 1)


def period_label(period: Period) -> tuple[int, int]:
    """The label of a period computed by a ``BillingSchedule``: the month holding its last
    local day (in the period's own timezone). ``BillingSchedule.period(*period_label(p)) == p``.
    """
    last_day = period.local_end_date - timedelta(days=1)
    return last_day.year, last_day.month


def account_period(account: Account, year: int, month: int) -> Period:
    """The account's period labelled ``year-month`` under its policy and timezone history."""
    return BillingSchedule.of(account).period(year, month)
