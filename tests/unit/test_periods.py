"""Billing periods (BILLING-SEMANTICS §2): calendar months in an account's timezone, as UTC."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from datetime import timezone as dt_timezone
from zoneinfo import ZoneInfo

import pytest

from invoicer.periods import (
    BillingSchedule,
    Period,
    PeriodError,
    account_period,
    calendar_month,
    duration_us,
    format_instant,
    local_day_start,
    month_boundary,
    parse_period_label,
    period_label,
)
from rating.catalog import Account, BillingPeriod, PeriodPolicy, TimezoneChange

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


# -- billing-period policies (§2) ----------------------------------------------------------


def schedule(
    policy: BillingPeriod, tz: str = "Europe/Berlin", *changes: TimezoneChange
) -> BillingSchedule:
    return BillingSchedule(policy, tz, changes)


CALENDAR = BillingPeriod()
DAY_25 = BillingPeriod(PeriodPolicy.MONTH_END_DAY, day=25)
THREE_BEFORE = BillingPeriod(PeriodPolicy.DAYS_BEFORE_MONTH_END, days=3)
ANNIVERSARY_JAN_31 = BillingPeriod(PeriodPolicy.ANNIVERSARY, anchor=date(2026, 1, 31))
NOV_10 = utc(2026, 11, 10, 12)


@pytest.mark.parametrize(
    ("policy", "local", "as_utc"),
    [
        (
            CALENDAR,
            (date(2026, 11, 1), date(2026, 12, 1)),
            (utc(2026, 10, 31, 23), utc(2026, 11, 30, 23)),
        ),
        (
            DAY_25,
            (date(2026, 10, 26), date(2026, 11, 26)),
            (utc(2026, 10, 25, 23), utc(2026, 11, 25, 23)),
        ),
        (
            THREE_BEFORE,
            (date(2026, 10, 29), date(2026, 11, 28)),
            (utc(2026, 10, 28, 23), utc(2026, 11, 27, 23)),
        ),
        (
            ANNIVERSARY_JAN_31,
            (date(2026, 10, 31), date(2026, 11, 30)),
            (utc(2026, 10, 30, 23), utc(2026, 11, 29, 23)),
        ),
    ],
    ids=["calendar", "month-end-day-25", "3-days-before-month-end", "anniversary-jan-31"],
)
def test_every_row_of_the_period_table(
    policy: BillingPeriod, local: tuple[date, date], as_utc: tuple[datetime, datetime]
) -> None:
    period = schedule(policy).containing(NOV_10)

    assert (period.local_start_date, period.local_end_date) == local
    assert (period.start, period.end) == as_utc
    # labelled by the month of its last local day: November for every row
    assert schedule(policy).label_of(NOV_10) == (2026, 11)
    assert schedule(policy).period(2026, 11) == period


def test_p1_through_the_schedule() -> None:
    period = schedule(CALENDAR).period(2026, 10)

    assert (period.start, period.end) == (utc(2026, 9, 30, 22), utc(2026, 10, 31, 23))
    assert period.seconds == 745 * 3600


@pytest.mark.parametrize(
    ("tz", "year", "month", "hours"),
    [
        ("Europe/Berlin", 2026, 3, 743),  # spring forward 29 Mar
        ("Europe/Berlin", 2026, 10, 745),  # fall back 25 Oct
        ("America/New_York", 2026, 3, 743),  # 8 Mar
        ("America/New_York", 2026, 11, 721),  # 1 Nov
        ("Australia/Sydney", 2026, 4, 721),  # southern autumn: back on 5 Apr
        ("Australia/Sydney", 2026, 10, 743),  # southern spring: forward on 4 Oct
        ("UTC", 2026, 2, 672),  # 28 days
        ("UTC", 2028, 2, 696),  # leap year: 29 days
        ("UTC", 2026, 4, 720),  # 30 days
        ("UTC", 2026, 1, 744),  # 31 days
    ],
)
def test_dst_and_month_lengths_are_exact(tz: str, year: int, month: int, hours: int) -> None:
    assert schedule(CALENDAR, tz).period(year, month).seconds == hours * 3600


def test_a_month_end_day_period_across_berlin_spring_forward() -> None:
    # day 30: [2026-03-01, 2026-03-31), 30 days, one of them (29 March) 23 h long
    period = schedule(BillingPeriod(PeriodPolicy.MONTH_END_DAY, day=30)).period(2026, 3)

    assert (period.local_start_date, period.local_end_date) == (
        date(2026, 3, 1),
        date(2026, 3, 31),
    )
    assert period.seconds == (30 * 24 - 1) * 3600


def test_an_anniversary_period_across_sydney_daylight_saving_start() -> None:
    policy = BillingPeriod(PeriodPolicy.ANNIVERSARY, anchor=date(2026, 1, 15))
    period = schedule(policy, "Australia/Sydney").containing(utc(2026, 10, 10))

    assert (period.local_start_date, period.local_end_date) == (
        date(2026, 9, 15),
        date(2026, 10, 15),
    )
    assert period.seconds == (30 * 24 - 1) * 3600
    assert period.start == utc(2026, 9, 14, 14)  # AEST +10


@pytest.mark.parametrize(
    ("day", "label", "last_day"),
    [
        (29, (2026, 2), date(2026, 2, 28)),
        (29, (2028, 2), date(2028, 2, 29)),  # the leap day itself ends February
        (29, (2026, 3), date(2026, 3, 29)),
        (30, (2026, 2), date(2026, 2, 28)),
        (30, (2026, 3), date(2026, 3, 30)),
        (30, (2026, 4), date(2026, 4, 30)),
        (31, (2026, 4), date(2026, 4, 30)),
        (31, (2026, 5), date(2026, 5, 31)),
        (31, (2028, 2), date(2028, 2, 29)),
    ],
)
def test_month_end_days_29_to_31_clamp_to_the_last_day(
    day: int, label: tuple[int, int], last_day: date
) -> None:
    period = schedule(BillingPeriod(PeriodPolicy.MONTH_END_DAY, day=day), "UTC").period(*label)

    assert period.local_end_date - timedelta(days=1) == last_day
    previous = schedule(BillingPeriod(PeriodPolicy.MONTH_END_DAY, day=day), "UTC").period(
        label[0] - (label[1] == 1), (label[1] - 2) % 12 + 1
    )
    assert previous.end == period.start


def test_month_end_day_31_is_the_calendar_month() -> None:
    for month in range(1, 13):
        assert schedule(BillingPeriod(PeriodPolicy.MONTH_END_DAY, day=31)).period(
            2028, month
        ) == schedule(CALENDAR).period(2028, month)


def test_anniversary_on_the_leap_day() -> None:
    policy = BillingPeriod(PeriodPolicy.ANNIVERSARY, anchor=date(2028, 2, 29))
    tiles = schedule(policy, "UTC").tiling(utc(2028, 2, 29), utc(2029, 4, 1))
    starts = [p.local_start_date for p in tiles]

    assert starts[:3] == [date(2028, 2, 29), date(2028, 3, 29), date(2028, 4, 29)]
    assert date(2029, 2, 28) in starts  # no 29th in 2029: clamps
    assert date(2029, 3, 29) in starts  # and returns to the anchor day after


def test_anniversary_from_the_31st_clamps_and_returns() -> None:
    tiles = schedule(ANNIVERSARY_JAN_31, "UTC").tiling(utc(2026, 1, 31), utc(2026, 5, 1))

    assert [p.local_start_date for p in tiles] == [
        date(2026, 1, 31),
        date(2026, 2, 28),
        date(2026, 3, 31),
        date(2026, 4, 30),
    ]


def test_days_before_month_end_in_february() -> None:
    period = schedule(THREE_BEFORE, "UTC").period(2026, 2)

    # last day of February 2026 is the 28th: the period's last day is the 25th
    assert (period.local_start_date, period.local_end_date) == (
        date(2026, 1, 29),
        date(2026, 2, 26),
    )


def test_an_instant_on_a_boundary_belongs_to_the_next_period() -> None:
    october = schedule(CALENDAR).period(2026, 10)

    assert schedule(CALENDAR).containing(october.end).start == october.end
    assert schedule(CALENDAR).containing(october.end - timedelta(seconds=1)) == october


def test_a_timezone_change_takes_effect_at_the_previous_periods_end() -> None:
    # Berlin until December 2026, New York from January 2027
    s = schedule(CALENDAR, "Europe/Berlin", TimezoneChange(2027, 1, "America/New_York"))
    december, january, february = s.period(2026, 12), s.period(2027, 1), s.period(2027, 2)

    assert december.timezone == "Europe/Berlin"
    assert december.end == utc(2026, 12, 31, 23)  # Berlin midnight
    assert january.start == december.end  # no gap, no overlap
    assert january.end == utc(2027, 2, 1, 5)  # New York midnight
    assert january.timezone == "America/New_York"
    assert january.seconds == (31 * 24 + 6) * 3600
    assert february.start == january.end


def test_tiling_covers_a_range_without_gaps_or_overlaps() -> None:
    tiles = schedule(DAY_25).tiling(utc(2026, 1, 1), utc(2027, 1, 1))

    assert tiles[0].start <= utc(2026, 1, 1) < tiles[0].end
    assert tiles[-1].start < utc(2027, 1, 1) <= tiles[-1].end
    assert all(a.end == b.start for a, b in itertools.pairwise(tiles))
    assert len(tiles) == 13


def test_account_period_uses_the_accounts_policy() -> None:
    account = Account("a", "A", "EUR", "Europe/Berlin", billing_period=DAY_25)

    assert account_period(account, 2026, 11) == schedule(DAY_25).period(2026, 11)


def test_an_anniversary_without_anchor_falls_back_to_calendar_months() -> None:
    account = Account("a", "A", "EUR", "UTC", BillingPeriod(PeriodPolicy.ANNIVERSARY))

    assert account_period(account, 2026, 11) == calendar_month(2026, 11, "UTC")


def test_month_boundary_rejects_an_incomplete_policy() -> None:
    with pytest.raises(PeriodError, match="without a day"):
        month_boundary(BillingPeriod(PeriodPolicy.MONTH_END_DAY), 2026, 1)


def test_period_label_is_the_month_of_the_last_local_day() -> None:
    s = schedule(BillingPeriod(PeriodPolicy.MONTH_END_DAY, day=30), "UTC")

    # two periods start in March 2026 ([03-01, 03-31) and [03-31, 05-01)): labels 03 and 04
    assert period_label(s.period(2026, 3)) == (2026, 3)
    assert period_label(s.period(2026, 4)) == (2026, 4)
    assert s.period(2026, 4).local_start_date == date(2026, 3, 31)
    assert period_label(schedule(DAY_25).containing(NOV_10)) == (2026, 11)
