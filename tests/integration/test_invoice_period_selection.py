"""`close --period`, `invoice issue --period` and `invoice list --period` select the same
period: per account, the one whose last local day falls in the month (period_label)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregation.factory import open_store
from meterline.cli import main as meterline

pytestmark = pytest.mark.integration

CATALOG = """
meters: []
plans:
  - {id: backup, name: Backup add-on, recurring: {fee: {EUR: "12.00"}}}
accounts:
  - id: day25
    name: Day 25 GmbH
    currency: EUR
    timezone: Europe/Berlin
    billing_period: {policy: month_end_day, day: "25"}
  - {id: cal, name: Calendar AG, currency: EUR, timezone: Europe/Berlin}
subscriptions:
  - {id: day25-backup, account: day25, plan: backup, start: "2026-01-01T00:00:00+01:00"}
  - {id: cal-backup, account: cal, plan: backup, start: "2026-01-01T00:00:00+01:00"}
"""
NOW = "2026-12-05T00:00:00Z"  # both accounts' November periods (and October's) are closable


@pytest.fixture
def store_args(tmp_path: Path) -> list[str]:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG, encoding="utf-8")
    url = f"duckdb://{tmp_path / 'store.duckdb'}"
    assert meterline(["catalog", "apply", str(catalog), "--store", url]) == 0
    return ["--store", url]


def _listed(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_a_month_end_day_25_account_selects_the_same_period_in_close_list_and_issue(
    store_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # October's drafts exist too, so a wrong rule would pick the wrong one, not nothing.
    for label in ("2026-10", "2026-11"):
        assert meterline(["close", "--period", label, "--now", NOW, *store_args]) == 0
    capsys.readouterr()

    # close --period 2026-11 drafted [2026-10-26, 2026-11-26) for day25 (its last day, the
    # 25th, is in November) although that period starts in October.
    assert meterline(["invoice", "list", "--period", "2026-11", *store_args]) == 0
    assert _listed(capsys) == ["cal/2026-11-01", "day25/2026-10-26"]
    assert meterline(["invoice", "list", "--period", "2026-10", *store_args]) == 0
    assert _listed(capsys) == ["cal/2026-10-01", "day25/2026-09-26"]

    assert (
        meterline(
            ["invoice", "issue", "--period", "2026-11", "--now", NOW, "--no-publish", *store_args]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "issued cal/2026-11-01" in out
    assert "issued day25/2026-10-26" in out
    assert "day25/2026-09-26" not in out

    store = open_store(store_args[1])
    try:
        status = {s.key: s.status for s in store.load_invoices()}
    finally:
        store.close()
    assert status == {
        "cal/2026-10-01": "draft",
        "cal/2026-11-01": "issued",
        "day25/2026-09-26": "draft",
        "day25/2026-10-26": "issued",
    }


def test_list_refuses_a_malformed_period(
    store_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert meterline(["invoice", "list", "--period", "2026-13", *store_args]) == 2
    assert "2026-13" in capsys.readouterr().err
