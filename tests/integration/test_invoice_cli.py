"""The lifecycle commands of the console script on a real (DuckDB) store: close, issue,
export (JSON, CSV, HTML), list, preview, explain, and the scheduler mode of close."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from aggregation.factory import open_store
from aggregation.ports import LEDGER_SCHEMA, PARTIALS_SCHEMA
from invoicer.exports import CSV_COLUMNS
from meterline.cli import main as meterline

pytestmark = pytest.mark.integration

CATALOG = Path(__file__).parents[1] / "e2e" / "catalog.yaml"
NOW = "2026-11-01T03:00:00Z"
KEY = "acme/2026-10-01"
USAGE_LINE = "acme/2026-10-01/acme-vps/usage/net.egress.bytes"


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"duckdb://{tmp_path / 'store.duckdb'}"
    assert meterline(["catalog", "apply", str(CATALOG), "--store", url]) == 0
    store = open_store(url)
    try:
        hour = datetime(2026, 10, 10, 8, tzinfo=UTC)
        ledger = pl.DataFrame(
            [
                ("agent-a", 1, "usage.samples.v1", 3, 41, hour, 2),
                ("agent-b", 7, "usage.samples.v1", 3, 44, hour, 1),
            ],
            schema=LEDGER_SCHEMA,
            orient="row",
        )
        q = Decimal(600 * 10**9)
        partials = pl.DataFrame(
            [
                ("agent-a", 1, "acme-vps", "net.egress.bytes", hour, q, q, 2),
                ("agent-b", 7, "acme-vps", "net.egress.bytes", hour, q, q, 1),
            ],
            schema=PARTIALS_SCHEMA,
            orient="row",
        )
        store.write_rated(ledger, partials, [], hour)
    finally:
        store.close()
    return url


def test_close_issue_export_and_explain(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--store", store_url]
    assert meterline(["close", "--period", "2026-10", "--now", NOW, *store]) == 0
    capsys.readouterr()

    # Issue needs exactly one way of choosing invoices.
    assert meterline(["invoice", "issue", "--now", NOW, "--no-publish", *store]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert meterline(["invoice", "issue", "--period", "2026-10", "--no-publish", *store]) == 0
    assert f"issued {KEY}: ML-2026-000001" in capsys.readouterr().out
    assert meterline(["invoice", "issue", KEY, "--no-publish", *store]) == 2
    assert "already issued" in capsys.readouterr().err

    assert meterline(["invoice", "list", *store]) == 0
    listed = capsys.readouterr().out
    assert KEY in listed
    assert "ML-2026-000001" in listed

    out = tmp_path / "invoice.csv"
    assert meterline(["invoice", "export", KEY, "--format", "csv", "--out", str(out), *store]) == 0
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS
    by_line = {row[CSV_COLUMNS.index("line_key")]: row for row in rows[1:]}
    usage = by_line[USAGE_LINE]
    assert usage[CSV_COLUMNS.index("invoice_number")] == "ML-2026-000001"
    assert usage[CSV_COLUMNS.index("amount")] == "2.00"  # 1,200 GB - 1,000 included, x 0.01
    assert usage[CSV_COLUMNS.index("amount_minor")] == "200"

    capsys.readouterr()
    assert meterline(["invoice", "export", KEY, "--format", "html", *store]) == 0
    page = capsys.readouterr().out
    assert page.startswith("<!DOCTYPE html>")
    assert "Invoice ML-2026-000001" in page
    assert "Subscription acme-vps (plan vps-s)" in page
    assert "2026-10-01 00:00 to 2026-11-01 00:00" in page  # service period in Berlin time

    assert meterline(["invoice", "export", KEY, "--format", "json", *store]) == 0
    assert json.loads(capsys.readouterr().out)["number"] == "ML-2026-000001"
    assert meterline(["invoice", "export", "nobody/2026-10-01", *store]) == 2

    assert meterline(["explain", KEY, USAGE_LINE, *store]) == 0
    explained = capsys.readouterr().out
    assert "1 hour(s), quantity 1200000000000 (base units)" in explained
    assert "2026-10-10T08:00Z" in explained
    assert "usage.samples.v1 partition 3: offsets 41..44 (2 batch(es)" in explained
    assert meterline(["explain", KEY, f"{KEY}/acme-backup/recurring", *store]) == 0
    assert "no metered usage" in capsys.readouterr().out
    assert meterline(["explain", KEY, "no-such-line", *store]) == 2
    assert "has no line" in capsys.readouterr().err


def test_preview_renders_the_open_period_without_saving(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["preview", "--account", "acme", "--now", "2026-10-20T12:00:00Z", "--store", store_url]
    assert meterline([*args, "--format", "json"]) == 0
    preview = json.loads(capsys.readouterr().out)
    assert preview["key"] == KEY
    assert preview["status"] == "draft"
    assert {line["key"]: line["amount_minor"] for line in preview["lines"]}[USAGE_LINE] == 200
    assert meterline(args) == 0
    assert "PREVIEW" in capsys.readouterr().out
    store = open_store(store_url)
    try:
        assert store.load_invoices() == []
    finally:
        store.close()
    assert meterline(["preview", "--account", "nobody", "--store", store_url]) == 2


def test_scheduled_close_waits_until_closable_then_closes(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    early = ["close", "--scheduled", "--interval", "0.01", "--max-runs", "2"]
    assert meterline([*early, "--now", "2026-11-01T00:30:00Z", "--store", store_url]) == 0
    out = capsys.readouterr().out
    assert out.count("waiting: period 2026-10 cannot be closed yet") == 2
    store = open_store(store_url)
    try:
        assert store.load_invoices() == []
    finally:
        store.close()

    assert meterline([*early, "--now", NOW, "--store", store_url]) == 0
    out = capsys.readouterr().out
    assert out.count("closed 2026-10: 1 draft(s) saved") == 2
    store = open_store(store_url)
    try:
        assert [i.key for i in store.load_invoices()] == [KEY]
    finally:
        store.close()
    assert meterline(["close", "--store", store_url]) == 2
    assert "--period" in capsys.readouterr().err


def test_scheduled_close_stops_on_sigterm(store_url: str) -> None:
    command = [
        str(Path(sys.executable).with_name("meterline")),
        "close",
        "--scheduled",
        "--interval",
        "3600",
        "--now",
        NOW,
        "--store",
        store_url,
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            first = process.stdout.readline()  # the first run is done: now it sleeps
            assert "closed 2026-10" in first
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
