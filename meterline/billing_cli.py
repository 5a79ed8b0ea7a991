"""The invoice lifecycle commands of the console script (wiring only): ``invoice issue``,
``invoice export``, ``invoice list``, ``events publish``, ``preview``, ``explain`` and the
scheduler mode of ``close``. ``meterline.cli.build_parser`` registers them."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from meterline.cli import EXIT_FAILED, EXIT_OK, UsageError, _instant, _settings

Handler = Callable[[argparse.Namespace], int]


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _publish(store_url: str, bootstrap: str, now: datetime) -> int:
    """Publish the outbox; return how many events went out."""
    from invoicer.issue import publish_pending
    from meterline.billing_events_kafka import KafkaBillingEventSink
    from meterline.wiring import open_migrated_store

    store = open_migrated_store(store_url)
    sink = KafkaBillingEventSink(bootstrap)
    try:
        return publish_pending(store, sink, now)
    finally:
        sink.close()
        store.close()


def cmd_invoice_issue(args: argparse.Namespace) -> int:
    from invoicer.issue import drafts_of, issue_invoices
    from meterline.billing_events_kafka import BillingEventPublishError
    from meterline.wiring import open_migrated_store, system_clock

    chosen = sum(bool(x) for x in (args.keys, args.period, args.all))
    if chosen != 1:
        raise UsageError("give invoice KEYs, or --period YYYY-MM, or --all (exactly one)")
    settings = _settings(args)
    now = args.now or system_clock()
    store = open_migrated_store(settings.store_url)
    try:
        keys = list(args.keys) if args.keys else drafts_of(store, args.period)
        result = issue_invoices(
            store, keys, now, args.issuer or settings.invoice_issuer, settings.billing_events_topic
        )
    finally:
        store.close()
    for stored in result.issued:
        _say(f"issued {stored.key}: {_number(stored.document)}")
    if not result.issued:
        _say("no drafts to issue")
    if args.no_publish:
        return EXIT_OK
    try:
        published = _publish(settings.store_url, settings.kafka_bootstrap, system_clock())
    except BillingEventPublishError as exc:
        _err(
            f"meterline: the invoices are issued, but their events are not yet published "
            f"({exc}); run `meterline events publish`"
        )
        return EXIT_FAILED
    _say(f"published {published} billing event(s)")
    return EXIT_OK


def _number(document: str) -> str:
    return str(json.loads(document).get("number"))


def cmd_events_publish(args: argparse.Namespace) -> int:
    from meterline.billing_events_kafka import BillingEventPublishError
    from meterline.wiring import system_clock

    settings = _settings(args)
    try:
        published = _publish(settings.store_url, settings.kafka_bootstrap, system_clock())
    except BillingEventPublishError as exc:
        _err(f"meterline: {exc}; nothing more was marked published")
        return EXIT_FAILED
    _say(f"published {published} billing event(s)")
    return EXIT_OK


def cmd_invoice_export(args: argparse.Namespace) -> int:
    from invoicer.exports import parse_document, to_csv, to_html
    from meterline.wiring import open_migrated_store

    store = open_migrated_store(_settings(args).store_url)
    try:
        stored = store.load_invoice(args.key)
    finally:
        store.close()
    if stored is None:
        raise UsageError(f"no invoice {args.key!r}")
    if args.format == "json":
        text = stored.document + "\n"
    else:
        document = parse_document(stored.document, f"invoice {args.key!r}")
        text = to_csv(document) if args.format == "csv" else to_html(document)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8", newline="")
        _say(f"{args.format} of {args.key} written to {args.out}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_invoice_list(args: argparse.Namespace) -> int:
    from invoicer.issue import document_period_label
    from invoicer.periods import parse_period_label
    from meterline.wiring import open_migrated_store
    from rating.money import format_minor

    if args.period:
        parse_period_label(args.period)  # a clear error for a malformed label
    store = open_migrated_store(_settings(args).store_url)
    try:
        invoices = store.load_invoices()
    finally:
        store.close()
    for stored in invoices:
        document = json.loads(stored.document)
        if args.period and document_period_label(document, stored.key) != args.period:
            continue
        _say(
            f"{stored.key:<48} {stored.status:<7} {document.get('number') or '-':<16} "
            f"{document.get('document_type', 'invoice'):<12} "
            f"{format_minor(stored.total_minor, stored.currency):>14} {stored.currency}"
        )
    return EXIT_OK


def cmd_preview(args: argparse.Namespace) -> int:
    from invoicer.documents import invoice_to_json, invoices_to_text
    from invoicer.preview import preview_invoice
    from meterline.wiring import current_catalog, open_migrated_store, system_clock

    now = args.now or system_clock()
    store = open_migrated_store(_settings(args).store_url)
    try:
        invoice = preview_invoice(store, current_catalog(store), args.account, now)
    finally:
        store.close()
    if args.format == "json":
        _say(invoice_to_json(invoice))
    else:
        _say(f"PREVIEW at {now.isoformat()} (not saved; the period is still open)")
        _say(invoices_to_text([invoice]))
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    import polars as pl

    from invoicer.preview import explain_line
    from meterline.wiring import open_migrated_store

    store = open_migrated_store(_settings(args).store_url)
    try:
        found = explain_line(store, store.load_invoice(args.invoice), args.invoice, args.line)
    finally:
        store.close()
    line = found.line
    _say(f"invoice {found.invoice_key}, line {line['key']}")
    _say(f"  {line['kind']}: {line['description']}")
    _say(
        f"  service period [{line['service_period']['start']}, "
        f"{line['service_period']['end']}); quantity {line['quantity']} {line['unit']} "
        f"x {line['unit_price']} = {line['amount']} {line['currency']}"
    )
    refs = line["refs"]
    _say("  refs: " + ", ".join(f"{k}={v}" for k, v in sorted(refs.items()) if v is not None))
    if found.hourly is None:
        _say("  no metered usage behind this line: it comes from the catalog's subscription")
        _say("  and resource spans (see refs)")
        return EXIT_OK
    hourly = found.hourly
    _say(
        f"  hourly buckets of {refs['subscription_id']} / {refs['meter']} in "
        f"[{found.usage_start}, {found.usage_end}): {hourly.height} hour(s), "
        f"quantity {hourly['quantity'].sum() if hourly.height else 0} (base units), "
        f"{hourly['sample_count'].sum() if hourly.height else 0} samples"
    )
    for row in hourly.head(args.max_hours).iter_rows(named=True):
        _say(
            f"    {row['hour_start']:%Y-%m-%dT%H:%MZ}  quantity {row['quantity']}  "
            f"max {row['quantity_max']}  samples {row['sample_count']}"
        )
    if hourly.height > args.max_hours:
        _say(f"    ... {hourly.height - args.max_hours} more hour(s) (--max-hours)")
    batches = found.batches
    assert batches is not None
    if batches.height == 0:
        _say("  source batches: none recorded (counted before schema version 3)")
        return EXIT_OK
    ranges = (
        batches.group_by("topic", "partition")
        .agg(
            pl.col("offset").min().alias("first"),
            pl.col("offset").max().alias("last"),
            pl.len().alias("batches"),
        )
        .sort("topic", "partition")
    )
    _say(f"  source batches: {batches.height}, offset ranges in the usage archive:")
    for row in ranges.iter_rows(named=True):
        _say(
            f"    {row['topic']} partition {row['partition']}: offsets "
            f"{row['first']}..{row['last']} ({row['batches']} batch(es) in the range)"
        )
    return EXIT_OK


def run_scheduled_close(args: argparse.Namespace) -> int:
    """Every ``--interval`` seconds, close the month before the current one (UTC). The close
    refuses (and the loop waits) until every account's end + grace has passed; once closed,
    each run re-closes it, which is idempotent and turns late usage into adjustments. Stops
    on SIGTERM/SIGINT (after the run in progress) or after ``--max-runs``."""
    if args.interval <= 0:
        raise UsageError(f"--interval must be positive, got {args.interval}")
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        return _scheduler_loop(args, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _scheduler_loop(args: argparse.Namespace, stop: threading.Event) -> int:
    from invoicer.close import PeriodNotClosableError, close_period
    from meterline.wiring import current_catalog, open_migrated_store, system_clock

    settings = _settings(args)
    runs = 0
    while not stop.is_set():
        now = args.now or system_clock()
        index = now.year * 12 + now.month - 2  # the previous month
        year, month = index // 12, index % 12 + 1
        store = open_migrated_store(settings.store_url)
        try:
            result = close_period(store, current_catalog(store), year, month, now)
            _say(
                f"{now.isoformat()} closed {year:04d}-{month:02d}: {len(result.stored)} "
                f"draft(s) saved, {len(result.untouched)} issued invoice(s) untouched"
            )
        except PeriodNotClosableError as exc:
            _say(f"{now.isoformat()} waiting: {exc}")
        finally:
            store.close()
        runs += 1
        if args.max_runs is not None and runs >= args.max_runs:
            break
        stop.wait(args.interval)
    return EXIT_OK


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    command: Callable[[str, Handler, str], argparse.ArgumentParser],
    store_option: Callable[[argparse.ArgumentParser], None],
    kafka_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    invoice = commands.add_parser("invoice", help="issue, list and export invoices")
    invoice_commands = invoice.add_subparsers(dest="invoice_command", required=True)
    issue = invoice_commands.add_parser(
        "issue", help="number and freeze drafts (gapless per-issuer series), publish events"
    )
    issue.add_argument("keys", nargs="*", metavar="KEY", help="invoice keys to issue")
    issue.add_argument(
        "--period",
        help="every draft of the period labelled YYYY-MM: per account, the period whose last "
        "local day is in that month (as `close --period` selects it)",
    )
    issue.add_argument("--all", action="store_true", help="every draft")
    issue.add_argument("--issuer", help="series prefix (default: METERLINE_INVOICE_ISSUER)")
    issue.add_argument("--now", type=_instant, help="the issue instant (default: now)")
    issue.add_argument("--no-publish", action="store_true", help="leave the events in the outbox")
    store_option(issue)
    kafka_option(issue)
    issue.set_defaults(handler=cmd_invoice_issue)

    export = invoice_commands.add_parser("export", help="an invoice as JSON, CSV or HTML")
    export.add_argument("key")
    export.add_argument("--format", choices=("json", "csv", "html"), default="json")
    export.add_argument("--out", help="write to this file (default: stdout)")
    store_option(export)
    export.set_defaults(handler=cmd_invoice_export)

    listing = invoice_commands.add_parser("list", help="invoices with status and number")
    listing.add_argument(
        "--period",
        help="only the period labelled YYYY-MM (per account, the one whose last local day is "
        "in that month, as `close --period`)",
    )
    store_option(listing)
    listing.set_defaults(handler=cmd_invoice_list)

    events = commands.add_parser("events", help="billing events outbox")
    events_commands = events.add_subparsers(dest="events_command", required=True)
    publish = events_commands.add_parser(
        "publish", help="publish pending billing events to Kafka (at least once)"
    )
    store_option(publish)
    kafka_option(publish)
    publish.set_defaults(handler=cmd_events_publish)

    sub = command("preview", cmd_preview, "the open period's draft for one account (not saved)")
    sub.add_argument("--account", required=True)
    sub.add_argument("--now", type=_instant, help="the clock (default: now)")
    sub.add_argument("--format", choices=("text", "json"), default="text")
    store_option(sub)

    sub = command("explain", cmd_explain, "walk from an invoice line to hours and batches")
    sub.add_argument("invoice", metavar="INVOICE_KEY")
    sub.add_argument("line", metavar="LINE_KEY")
    sub.add_argument("--max-hours", type=int, default=48, help="hours to list (default 48)")
    store_option(sub)


def add_scheduler_options(close: argparse.ArgumentParser) -> None:
    close.add_argument(
        "--scheduled", action="store_true", help="run on a loop (see --interval), until SIGTERM"
    )
    close.add_argument("--interval", type=float, default=60.0, help="seconds between runs")
    close.add_argument("--max-runs", type=int, help="with --scheduled: stop after N runs")


def scheduled_or(handler: Handler) -> Handler:
    """The close handler: the scheduler loop with --scheduled, else ``handler``."""

    def dispatch(args: argparse.Namespace) -> int:
        if args.scheduled:
            if args.period:
                raise UsageError("--scheduled picks its periods itself: drop --period")
            return run_scheduled_close(args)
        if not args.period:
            raise UsageError("close needs --period YYYY-MM (or --scheduled)")
        return handler(args)

    return dispatch
