"""The console script on a real (DuckDB) store: bad input is named, and changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregation.factory import open_store
from meterline.cli import main as meterline

GOOD = Path(__file__).parents[1] / "e2e" / "catalog.yaml"


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"duckdb://{tmp_path / 'store.duckdb'}"


def catalog_versions(url: str) -> int | None:
    store = open_store(url)
    try:
        store.migrate()
        stored = store.load_catalog()
        return None if stored is None else stored.version
    finally:
        store.close()


def test_a_bad_catalog_names_every_problem_and_applies_nothing(
    tmp_path: Path, store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    text = GOOD.read_text()
    text = text.replace('unit_price: {EUR: "0.0100"}', 'unit_price: {EUR: "0,01"}')
    text = text.replace("plan: backup", "plan: bakup")
    bad.write_text(text)

    assert meterline(["catalog", "apply", str(bad), "--store", store_url]) == 2

    err = capsys.readouterr().err
    assert "nothing applied" in err
    assert f"{bad}: plans[0].usage[0].unit_price.EUR:" in err
    assert "'0,01'" in err
    assert f"{bad}: subscriptions[1].plan:" in err
    assert "'bakup'" in err
    assert catalog_versions(store_url) is None


def test_apply_stores_a_version_once_and_check_changes_nothing(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert meterline(["catalog", "check", str(GOOD)]) == 0
    assert "valid" in capsys.readouterr().out
    assert meterline(["catalog", "apply", str(GOOD), "--store", store_url]) == 0
    assert meterline(["catalog", "apply", str(GOOD), "--store", store_url]) == 0
    assert "unchanged (version 1)" in capsys.readouterr().out
    assert catalog_versions(store_url) == 1


def test_closing_a_period_that_is_not_closable_says_so_and_saves_nothing(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert meterline(["catalog", "apply", str(GOOD), "--store", store_url]) == 0
    # Berlin's October ends 2026-10-31T23:00Z; with 2 h grace it is closable from 01:00Z.
    args = ["close", "--period", "2026-10", "--now", "2026-11-01T00:30:00Z"]
    assert meterline([*args, "--store", store_url]) == 1
    assert "acme" in capsys.readouterr().err
    store = open_store(store_url)
    try:
        assert store.load_invoices() == []
    finally:
        store.close()


def test_a_malformed_period_or_instant_is_bad_input(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert meterline(["close", "--period", "2026-13", "--store", store_url]) == 2
    assert "2026-13" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        meterline(["close", "--period", "2026-10", "--now", "2026-11-01T00:30:00"])
    assert exited.value.code == 2
    assert "no offset" in capsys.readouterr().err
