"""Billing periods (BILLING-SEMANTICS §2): calendar months in an account's timezone, as UTC."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from datetime import timezone as dt_timezone
from zoneinfo import ZoneInfo

import pytest

from invoicer.periods import (
    Period,
    PeriodError,
    calendar_month,
    duration_us,
    format_instant,
    local_day_start,
    parse_period_label,
)

BERLIN = ZoneInfo("Europe/Berlin")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def test_p1_october_2026_in_berlin_has_745_hours() -> None:
    period = calendar_month(2026, 10, "Europe/Berlin")

    assert period.start == utc(2026, 9, 30, 22)
    assert period.end == utc(2026, 10, 31, 23)
    assert period.seconds == 745 * 3600
    assert period.local_start_date == date(2026, 10, 1)
    assert period.local_end_date == date(2026, 11, 1)


def test_calendar_month_row_of_the_period_table() -> None:
    # §2: the calendar month containing 2026-11-10, Europe/Berlin.
    period = calendar_month(2026, 11, "Europe/Berlin")

    assert (period.start, period.end) == (utc(2026, 10, 31, 23), utc(2026, 11, 30, 23))


def test_march_in_berlin_loses_an_hour() -> None:
    assert calendar_month(2026, 3, "Europe/Berlin").seconds == 743 * 3600


def test_utc_november_has_720_hours() -> None:
    period = calendar_month(2026, 11, "UTC")

    assert (period.start, period.end) == (utc(2026, 11, 1), utc(2026, 12, 1))
    assert period.seconds == 720 * 3600


def test_december_rolls_over_into_the_next_year() -> None:
    period = calendar_month(2026, 12, "Asia/Tokyo")

    assert (period.start, period.end) == (utc(2026, 11, 30, 15), utc(2026, 12, 31, 15))


def test_half_hour_zone_boundaries_are_not_on_utc_hours() -> None:
    period = calendar_month(2026, 10, "Asia/Kolkata")

    assert (period.start, period.end) == (utc(2026, 9, 30, 18, 30), utc(2026, 10, 31, 18, 30))


def test_consecutive_months_share_their_boundary() -> None:
    for month in range(1, 12):
        this = calendar_month(2026, month, "America/New_York")
        following = calendar_month(2026, month + 1, "America/New_York")
        assert this.end == following.start


def test_a_midnight_that_occurs_twice_starts_the_day_at_its_first_occurrence() -> None:
    # America/Havana leaves DST at 01:00 on 2026-11-01, back to 00:00: midnight happens twice.
    november = calendar_month(2026, 11, "America/Havana")

    assert november.start == utc(2026, 11, 1, 4)  # 00:00 at UTC-4, the first midnight
    assert calendar_month(2026, 10, "America/Havana").end == november.start


def test_a_midnight_that_does_not_exist_starts_the_day_at_the_transition() -> None:
    # America/Santiago enters DST on 2026-09-06: 00:00 (UTC-4) becomes 01:00 (UTC-3).
    start = local_day_start(date(2026, 9, 6), "America/Santiago")
    tz = ZoneInfo("America/Santiago")

    assert start == utc(2026, 9, 6, 4)
    assert start.astimezone(tz).date() == date(2026, 9, 6)
    assert (start - timedelta(seconds=1)).astimezone(tz).date() == date(2026, 9, 5)


def test_a_day_start_in_an_ordinary_zone_is_local_midnight() -> None:
    assert local_day_start(date(2026, 10, 25), "Europe/Berlin") == utc(2026, 10, 24, 22)


def test_durations_are_measured_between_utc_instants_not_wall_clocks() -> None:
    # The DST trap: both datetimes share one ZoneInfo, so plain subtraction says 24 h.
    start = datetime(2026, 10, 25, tzinfo=BERLIN)
    end = datetime(2026, 10, 26, tzinfo=BERLIN)

    assert end - start == timedelta(hours=24)  # wall clock
    assert duration_us(start, end) == 25 * 3600 * 1_000_000  # elapsed


def test_periods_hold_utc_instants_whatever_utc_tzinfo_they_were_given() -> None:
    period = Period(
        datetime(2026, 11, 1, tzinfo=ZoneInfo("UTC")),
        datetime(2026, 12, 1, tzinfo=dt_timezone.utc),  # noqa: UP017 (a second UTC tzinfo)
    )

    assert period.start.tzinfo is UTC
    assert period.end.tzinfo is UTC


@pytest.mark.parametrize(
    ("start", "end", "problem"),
    [
        (datetime(2026, 11, 1), utc(2026, 12, 1), "naive"),  # noqa: DTZ001
        (datetime(2026, 11, 1, tzinfo=BERLIN), utc(2026, 12, 1), "not UTC"),
        (utc(2026, 12, 1), utc(2026, 11, 1), "empty or reversed"),
        (utc(2026, 11, 1), utc(2026, 11, 1), "empty or reversed"),
        (utc(2026, 11, 1, 0, 0, 0, 5), utc(2026, 12, 1), "whole seconds"),
    ],
)
def test_a_bad_period_is_refused_with_a_reason(
    start: datetime, end: datetime, problem: str
) -> None:
    with pytest.raises(PeriodError, match=problem):
        Period(start, end)


def test_an_unknown_timezone_is_named() -> None:
    with pytest.raises(PeriodError, match="unknown IANA timezone 'Mars/Olympus'"):
        calendar_month(2026, 10, "Mars/Olympus")


def test_overlap_and_clip() -> None:
    period = calendar_month(2026, 10, "Europe/Berlin")

    assert period.overlap_us(utc(2026, 10, 10, 22), None) == 505 * 3600 * 1_000_000
    assert period.overlap_us(utc(2026, 1, 1), utc(2026, 9, 30, 22)) == 0
    assert period.clip(utc(2026, 1, 1), utc(2026, 10, 1)) == (period.start, utc(2026, 10, 1))
    assert period.clip(utc(2026, 11, 1), None) is None


def test_parse_period_label() -> None:
    assert parse_period_label("2026-10") == (2026, 10)
    assert parse_period_label("2027-01") == (2027, 1)


@pytest.mark.parametrize(
    ("label", "problem"),
    [
        ("2026-13", "month 13 is out of range"),
        ("2026-00", "month 00 is out of range"),
        ("2026-1", "YYYY-MM"),
        ("26-10", "YYYY-MM"),
        ("2026-10-01", "YYYY-MM"),
        (" 2026-10", "YYYY-MM"),
        ("october", "YYYY-MM"),
        ("0999-10", "year 999 is out of range"),
    ],
)
def test_a_bad_period_label_is_refused_with_a_reason(label: str, problem: str) -> None:
    with pytest.raises(PeriodError, match=problem) as excinfo:
        parse_period_label(label)
    assert repr(label) in str(excinfo.value)


def test_format_instant_is_iso_8601_utc_with_z() -> None:
    assert format_instant(utc(2026, 9, 30, 22)) == "2026-09-30T22:00:00Z"
    assert format_instant(datetime(2026, 10, 1, tzinfo=BERLIN)) == "2026-09-30T22:00:00Z"
