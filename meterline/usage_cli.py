"""``meterline rerate`` and ``meterline usage`` (wiring only); ``meterline.cli`` registers them.

- ``rerate --from ISO --to ISO [--apply]``: re-rate whole hours from the raw-batch archive
  with the current catalog, print the signed difference per (subscription, meter, hour) and
  per (subscription, meter); write it only with ``--apply`` (``rating.rerate``).
- ``usage --account ID | --subscription ID [--now ISO]``: usage and provisional charges so
  far in the open period (``invoicer.usage_to_date``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meterline.cli import EXIT_FAILED, EXIT_OK, UsageError, _instant, _settings

if TYPE_CHECKING:
    from rating.rerate import Rerating

Handler = Callable[[argparse.Namespace], int]


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def _signed(value: object) -> str:
    return f"{int(str(value)):+d}"


def cmd_rerate(args: argparse.Namespace) -> int:
    from aggregation.ports import ReplaceConflictError
    from meterline.wiring import current_catalog, open_migrated_store, system_clock
    from rating.parquet_archive import read_archive
    from rating.rerate import apply_rerating, hour_bounds, rerate

    settings = _settings(args)
    archive_dir = args.archive_dir or settings.rating_archive_dir
    if not archive_dir:
        raise UsageError(
            "no raw-batch archive: give --archive-dir or set METERLINE_RATING_ARCHIVE_DIR"
        )
    start_s, end_s = hour_bounds(args.start, args.end)
    archived = read_archive(Path(archive_dir), settings.usage_topic, start_s, end_s)
    store = open_migrated_store(settings.store_url)
    try:
        stored_catalog = store.load_catalog()
        catalog = current_catalog(store)
        stored = store.usage_hourly(args.start, args.end)
        rerating = rerate(archived, stored, catalog, args.start, args.end)
        changed: int | None = None
        conflict: str | None = None
        if args.apply:
            try:
                changed = apply_rerating(store, rerating, args.now or system_clock())
            except ReplaceConflictError as exc:
                conflict = str(exc)
    finally:
        store.close()
    version = stored_catalog.version if stored_catalog is not None else None
    if args.format == "json":
        _say(json.dumps(_rerate_document(rerating, version, args.apply, changed, conflict)))
    else:
        _rerate_text(rerating, version, args.apply, changed)
    if conflict is not None:
        sys.stderr.write(f"meterline: re-rating refused: {conflict}\n")
        return EXIT_FAILED
    return EXIT_OK


def _rerate_document(
    rerating: Rerating,
    version: int | None,
    apply: bool,
    changed: int | None,
    conflict: str | None,
) -> dict[str, Any]:
    rows = [
        {
            "subscription_id": r["subscription_id"],
            "meter": r["meter"],
            "hour_start": f"{r['hour_start']:%Y-%m-%dT%H:%M:%SZ}",
            "stored_quantity": str(r["stored_quantity"]),
            "rerated_quantity": str(r["rerated_quantity"]),
            "quantity_diff": str(r["quantity_diff"]),
            "stored_max": str(r["stored_max"]),
            "rerated_max": str(r["rerated_max"]),
            "max_diff": str(r["max_diff"]),
            "sample_count_diff": r["sample_count_diff"],
        }
        for r in rerating.diff.iter_rows(named=True)
    ]
    totals = [
        {
            "subscription_id": t["subscription_id"],
            "meter": t["meter"],
            "hours": t["hours"],
            "quantity_diff": str(t["quantity_diff"]),
            "sample_count_diff": t["sample_count_diff"],
        }
        for t in rerating.totals().iter_rows(named=True)
    ]
    return {
        "from": f"{rerating.start:%Y-%m-%dT%H:%M:%SZ}",
        "to": f"{rerating.end:%Y-%m-%dT%H:%M:%SZ}",
        "catalog_version": version,
        "archived_records": rerating.records,
        "batches": rerating.batches.height,
        "unresolved_samples": rerating.unresolved_samples,
        "rows": rows,
        "totals": totals,
        "applied": apply and conflict is None,
        "changed_rows": changed,
        "conflict": conflict,
    }


def _rerate_text(rerating: Rerating, version: int | None, apply: bool, changed: int | None) -> None:
    _say(
        f"re-rated [{rerating.start:%Y-%m-%dT%H:%MZ}, {rerating.end:%Y-%m-%dT%H:%MZ}) with "
        f"catalog version {version}: {rerating.records} archived record(s), "
        f"{rerating.batches.height} batch(es); {rerating.unresolved_samples} sample(s) do not "
        "resolve with this catalog (left out)"
    )
    diff = rerating.diff
    if diff.is_empty():
        _say("no difference: the store already holds these values")
    for r in diff.iter_rows(named=True):
        _say(
            f"  {r['subscription_id']:<24} {r['meter']:<28} {r['hour_start']:%Y-%m-%dT%H:%MZ}  "
            f"quantity {r['stored_quantity']} -> {r['rerated_quantity']} "
            f"({_signed(r['quantity_diff'])})  max {r['stored_max']} -> {r['rerated_max']}  "
            f"samples {_signed(r['sample_count_diff'])}"
        )
    if not diff.is_empty():
        _say("totals per subscription and meter:")
    for t in rerating.totals().iter_rows(named=True):
        _say(
            f"  {t['subscription_id']:<24} {t['meter']:<28} quantity "
            f"{_signed(t['quantity_diff'])} over {t['hours']} hour(s), samples "
            f"{_signed(t['sample_count_diff'])}"
        )
    _say(f"{diff.height} hour row(s) differ")
    if not apply:
        _say("dry run: nothing written (add --apply to write the re-rated hours)")
    elif changed is not None:
        _say(f"applied: {changed} hour row(s) changed; the ledger is unchanged")


def cmd_usage(args: argparse.Namespace) -> int:
    from invoicer.usage_to_date import usage_to_date, usage_to_dict, usage_to_text
    from meterline.wiring import current_catalog, open_migrated_store, system_clock

    now = args.now or system_clock()
    store = open_migrated_store(_settings(args).store_url)
    try:
        usage = usage_to_date(
            store,
            current_catalog(store),
            now,
            account_id=args.account,
            subscription_id=args.subscription,
        )
    finally:
        store.close()
    if args.format == "json":
        _say(json.dumps(usage_to_dict(usage), sort_keys=True, indent=2))
    else:
        _say(usage_to_text(usage))
    return EXIT_OK


def register(
    command: Callable[[str, Handler, str], argparse.ArgumentParser],
    store_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    sub = command(
        "rerate",
        cmd_rerate,
        "re-rate whole hours from the raw-batch archive with the current catalog; show the "
        "signed difference; write it only with --apply",
    )
    sub.add_argument("--from", dest="start", type=_instant, required=True, help="ISO instant")
    sub.add_argument("--to", dest="end", type=_instant, required=True, help="ISO instant")
    sub.add_argument("--apply", action="store_true", help="write the re-rated hours")
    sub.add_argument("--archive-dir", help="default: METERLINE_RATING_ARCHIVE_DIR")
    sub.add_argument("--now", type=_instant, help="the clock for updated_at (default: now)")
    sub.add_argument("--format", choices=("text", "json"), default="text")
    store_option(sub)

    sub = command(
        "usage", cmd_usage, "usage and provisional charges so far in the open billing period"
    )
    who = sub.add_mutually_exclusive_group(required=True)
    who.add_argument("--account")
    who.add_argument("--subscription")
    sub.add_argument("--now", type=_instant, help="the clock (default: now)")
    sub.add_argument("--format", choices=("text", "json"), default="text")
    store_option(sub)
