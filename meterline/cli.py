"""The ``meterline`` console script: one entry point, a subcommand per job. Wiring only."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meterline.settings import Settings

if TYPE_CHECKING:
    from rating.consumer_loop import ConsumerLoop

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad input from the command line: printed without a traceback, exit 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 instant: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no offset: write Z or +01:00")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: value
        for key, value in (
            ("store_url", getattr(args, "store", None)),
            ("kafka_bootstrap", getattr(args, "kafka", None)),
        )
        if value is not None
    }
    return Settings(**overrides)


# -- commands ---------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from aggregation.factory import open_store

    store = open_store(_settings(args).store_url)
    try:
        applied = store.migrate()
    finally:
        store.close()
    print(f"migrations applied: {applied or 'none (schema is current)'}")
    return EXIT_OK


def cmd_catalog_check(args: argparse.Namespace) -> int:
    from rating.catalog_file import read_catalog_file

    applied = read_catalog_file(Path(args.file))
    catalog = applied.catalog
    print(
        f"{args.file}: valid: {len(catalog.meters)} meters, {len(catalog.plans)} plans, "
        f"{len(catalog.accounts)} accounts, {len(catalog.subscriptions)} subscriptions, "
        f"{len(catalog.resources)} resources (sha256 {applied.digest[:12]})"
    )
    return EXIT_OK


def cmd_catalog_apply(args: argparse.Namespace) -> int:
    from meterline.wiring import open_migrated_store, system_clock
    from rating.catalog_file import read_catalog_file

    applied = read_catalog_file(Path(args.file))  # validates everything before any write
    store = open_migrated_store(_settings(args).store_url)
    try:
        current = store.load_catalog()
        if current is not None and current.digest == applied.digest:
            print(f"catalog unchanged (version {current.version})")
            return EXIT_OK
        version = store.save_catalog(
            applied.document, applied.digest, applied.source, system_clock()
        )
    finally:
        store.close()
    print(f"catalog version {version} applied from {args.file}")
    return EXIT_OK


def cmd_collector_serve(args: argparse.Namespace) -> int:
    from collectors.grpc_server import ServerTls, serve
    from collectors.ingest import Ingestor, IngestSettings
    from collectors.kafka_sink import KafkaSink
    from collectors.prometheus_metrics import MetricsServer, PrometheusMetrics
    from meterline.wiring import (
        CollectorRefresher,
        open_migrated_store,
        read_collector_inputs,
        system_clock,
    )

    settings = _settings(args)
    open_migrated_store(settings.store_url).close()
    inputs = read_collector_inputs(settings.store_url)
    authenticate = not args.insecure_no_auth
    if not authenticate:
        print(
            "meterline: WARNING: --insecure-no-auth: any caller may send any agent's batches",
            file=sys.stderr,
        )
    elif len(inputs.authenticator) == 0:
        print(
            "meterline: no active agent token yet: every call is refused until one is issued "
            "(`meterline agent token issue`)",
            file=sys.stderr,
        )
    host, _, port = (args.listen or settings.collector_listen).rpartition(":")
    tls: ServerTls | None = None
    if (args.tls_cert is None) != (args.tls_key is None) or (
        args.client_ca is not None and args.tls_cert is None
    ):
        raise UsageError("give --tls-cert and --tls-key together (and --client-ca only with them)")
    if args.tls_cert is not None:
        tls = ServerTls(
            Path(args.tls_cert).read_bytes(),
            Path(args.tls_key).read_bytes(),
            Path(args.client_ca).read_bytes() if args.client_ca is not None else None,
        )
    metrics = PrometheusMetrics()
    metrics_server: MetricsServer | None = None
    if args.metrics_port is not None:
        metrics_server = metrics.serve(args.metrics_port, settings.collector_metrics_host)
    sink = KafkaSink(settings.kafka_bootstrap)
    ingestor = Ingestor(
        inputs.directory,
        sink,
        IngestSettings(
            collector_id=settings.collector_id,
            topic=settings.usage_topic,
            rejects_topic=settings.rejects_topic,
            max_in_flight_batches_per_process=settings.collector_max_in_flight_batches_per_process,
        ),
        system_clock,
        authenticator=inputs.authenticator if authenticate else None,
        metrics=metrics,
    )
    refresher = CollectorRefresher(
        ingestor, settings.store_url, settings.collector_refresh_s, authenticate=authenticate
    )

    async def run() -> None:
        main = asyncio.current_task()
        assert main is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
        refreshing = asyncio.create_task(refresher.run())
        try:
            await serve(ingestor, host, int(port), tls=tls)  # stops gracefully when cancelled
        finally:
            refreshing.cancel()
            await asyncio.gather(refreshing, return_exceptions=True)

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        sink.close()
        if metrics_server is not None:
            metrics_server.stop()
    return EXIT_OK


def cmd_agent_token_issue(args: argparse.Namespace) -> int:
    from meterline.wiring import issue_agent_token, open_migrated_store, system_clock

    scope = [entry.strip() for entry in args.scope.split(",")]
    store = open_migrated_store(_settings(args).store_url)
    try:
        token = issue_agent_token(store, args.agent_id, scope, system_clock())
    finally:
        store.close()
    print(token)
    print(
        f"token issued for agent {args.agent_id!r}, scope {','.join(scope)}; it is shown only "
        "this once (the store keeps its sha256): give it to the agent as a secret",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_agent_token_revoke(args: argparse.Namespace) -> int:
    from meterline.wiring import open_migrated_store, system_clock

    store = open_migrated_store(_settings(args).store_url)
    try:
        revoked = store.revoke_agent_tokens(args.agent_id, system_clock())
    finally:
        store.close()
    print(
        f"revoked {revoked} active token(s) of agent {args.agent_id!r}; collectors refuse "
        "them from their next refresh"
    )
    return EXIT_OK


def _run_consumer(worker: ConsumerLoop[Any], args: argparse.Namespace) -> object:
    """Until idle (``--until-idle``), or until SIGTERM/SIGINT; returns the worker's stats."""
    if args.until_idle is not None:
        return worker.run_until_idle(args.until_idle, args.max_seconds)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return worker.run(stop)


def cmd_rate(args: argparse.Namespace) -> int:
    from meterline.wiring import current_catalog, open_migrated_store, system_clock
    from rating.worker import RatingWorker, WorkerConfig

    settings = _settings(args)
    store = open_migrated_store(settings.store_url)
    try:
        config = WorkerConfig(
            bootstrap=settings.kafka_bootstrap,
            topic=settings.usage_topic,
            group_id=settings.consumer_group,
            deadletter_topic=settings.deadletter_topic,
            max_records_per_poll=settings.rating_max_records_per_poll,
            archive_dir=Path(settings.rating_archive_dir) if settings.rating_archive_dir else None,
            consumer_config=(
                {"group.instance.id": settings.rating_group_instance_id}
                if settings.rating_group_instance_id is not None
                else {}
            ),
        )
        with RatingWorker(config, store, current_catalog(store), system_clock) as worker:
            stats: object = _run_consumer(worker, args)
    finally:
        store.close()
    print(stats)
    return EXIT_OK


def cmd_spans_run(args: argparse.Namespace) -> int:
    from meterline.wiring import current_catalog, open_migrated_store, system_clock
    from rating.lifecycle_worker import SpansConfig, SpansWorker

    settings = _settings(args)
    store = open_migrated_store(settings.store_url)
    try:
        config = SpansConfig(
            bootstrap=settings.kafka_bootstrap, topic=args.topic, group_id=args.group
        )
        with SpansWorker(config, store, current_catalog(store), system_clock) as worker:
            stats = _run_consumer(worker, args)
    finally:
        store.close()
    print(stats)
    return EXIT_OK


def cmd_agent_simulate(args: argparse.Namespace) -> int:
    from collectors.grpc_agent import simulate_fleet
    from collectors.simulator import FleetSpec
    from meterline.demo import METERS_BY_KIND
    from meterline.wiring import current_catalog, open_migrated_store

    store = open_migrated_store(_settings(args).store_url)
    try:
        catalog = current_catalog(store)
    finally:
        store.close()
    resources = sorted(r.id for r in catalog.resources.values() if r.kind == args.kind)
    if not resources:
        raise UsageError(f"the catalog has no resources of kind {args.kind!r}")
    spec = FleetSpec(
        resource_ids=tuple(resources),
        meters=METERS_BY_KIND[args.kind],
        start=args.start,
        end=args.end,
        hosts=min(args.hosts, len(resources)),
        interval_s=args.interval,
        batch_size=args.batch_size,
        seed=args.seed,
        agent_prefix=args.agent_prefix,
    )
    tokens: dict[str, str] | None = None
    if args.tokens_file is not None:
        loaded = json.loads(Path(args.tokens_file).read_text(encoding="utf-8"))
        if not isinstance(loaded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in loaded.items()
        ):
            raise UsageError(f"{args.tokens_file}: expected a JSON object agent_id -> token")
        tokens = loaded
    truth = asyncio.run(
        simulate_fleet(args.target, spec, ground_truth_path=Path(args.ground_truth), tokens=tokens)
    )
    print(
        f"sent {truth.samples_sent:,} samples in {truth.batches_sent:,} batches, "
        f"{truth.samples_accepted:,} accepted; ground truth in {args.ground_truth}"
    )
    for code, count in sorted(truth.rejections_by_code.items()):
        print(f"  rejected {count:,} samples: {code}")
    return EXIT_OK


def cmd_agent_run(args: argparse.Namespace) -> int:
    from collectors.agent_daemon import AgentDaemon, DaemonSettings, read_token_file
    from collectors.host_usage import HostReader
    from collectors.spool import Spool, SpoolSettings
    from meterline.wiring import system_clock

    settings = DaemonSettings(
        target=args.target,
        agent_id=args.agent_id,
        resource_id=args.resource_id,
        interval_s=args.interval,
        token=read_token_file(Path(args.token_file)) if args.token_file else None,
    )
    spool = Spool(
        Path(args.spool_dir),
        args.agent_id,
        SpoolSettings(max_batches=args.max_spool_batches, max_bytes=args.max_spool_bytes),
    )
    reader = HostReader(mounts=tuple(Path(m) for m in args.mount or ["/"]))
    daemon = AgentDaemon(settings, spool, reader, system_clock)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, daemon.stop)
        await daemon.run()

    try:
        asyncio.run(run())
    finally:
        spool.close()
    print(daemon.stats)
    return EXIT_OK


def cmd_close(args: argparse.Namespace) -> int:
    from invoicer.close import close_period
    from invoicer.documents import invoices_to_text
    from invoicer.periods import parse_period_label
    from invoicer.sharding import default_workers
    from meterline.wiring import current_catalog, open_migrated_store, system_clock

    year, month = parse_period_label(args.period)
    now = args.now or system_clock()
    store = open_migrated_store(_settings(args).store_url)
    try:
        result = close_period(
            store,
            current_catalog(store),
            year,
            month,
            now,
            workers=args.workers or default_workers(),
            keep_invoices=args.format == "text",  # json prints the saved documents
        )
    finally:
        store.close()
    if args.format == "json":
        print("[" + ",\n".join(s.document for s in result.stored) + "]")
    else:
        print(invoices_to_text(result.invoices))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from meterline.demo import run_demo

    return run_demo(Path(args.workdir).resolve())


# -- parser -----------------------------------------------------------------------------------


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="store URL (default: METERLINE_STORE_URL)")


def _kafka_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kafka", help="bootstrap servers (default: METERLINE_KAFKA_BOOTSTRAP)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterline", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("migrate", cmd_migrate, "apply pending store migrations")
    _store_option(sub)

    catalog = commands.add_parser("catalog", help="check or apply a catalog file")
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True)
    check = catalog_commands.add_parser("check", help="validate a catalog file, change nothing")
    check.add_argument("file")
    check.set_defaults(handler=cmd_catalog_check)
    apply = catalog_commands.add_parser(
        "apply", help="validate a catalog file and store it as the new version (all or nothing)"
    )
    apply.add_argument("file")
    _store_option(apply)
    apply.set_defaults(handler=cmd_catalog_apply)

    collector = commands.add_parser("collector", help="the gRPC ingest service")
    collector_commands = collector.add_subparsers(dest="collector_command", required=True)
    serve = collector_commands.add_parser("serve", help="validate batches, write them to Kafka")
    serve.add_argument("--listen", help="host:port (default: METERLINE_COLLECTOR_LISTEN)")
    _store_option(serve)
    _kafka_option(serve)
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="accept calls without an agent token (development only)",
    )
    serve.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics on PORT"
    )
    serve.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    serve.add_argument(
        "--client-ca", metavar="PEM", help="mutual TLS: require client certificates of this CA"
    )
    serve.set_defaults(handler=cmd_collector_serve)

    sub = command("rate", cmd_rate, "run a rating worker (consumer group member)")
    _store_option(sub)
    _kafka_option(sub)
    sub.add_argument("--until-idle", type=float, metavar="SECONDS", help="stop when idle this long")
    sub.add_argument("--max-seconds", type=float, default=3600.0, help="with --until-idle")

    spans = commands.add_parser("spans", help="resource spans from lifecycle events")
    spans_commands = spans.add_subparsers(dest="spans_command", required=True)
    sub = spans_commands.add_parser(
        "run", help="consume resource.events.v1 into the store's resource spans"
    )
    sub.set_defaults(handler=cmd_spans_run)
    _store_option(sub)
    _kafka_option(sub)
    sub.add_argument("--topic", default="resource.events.v1")
    sub.add_argument("--group", default="meterline-spans", help="consumer group")
    sub.add_argument("--until-idle", type=float, metavar="SECONDS", help="stop when idle this long")
    sub.add_argument("--max-seconds", type=float, default=3600.0, help="with --until-idle")

    agent = commands.add_parser("agent", help="agent tools")
    agent_commands = agent.add_subparsers(dest="agent_command", required=True)
    simulate = agent_commands.add_parser(
        "simulate", help="simulate a fleet (time compressed) and write its ground truth"
    )
    simulate.add_argument("--target", required=True, help="collector host:port")
    simulate.add_argument("--from", dest="start", type=_instant, required=True)
    simulate.add_argument("--to", dest="end", type=_instant, required=True)
    simulate.add_argument("--hosts", type=int, default=10)
    simulate.add_argument("--kind", default="server", choices=sorted(("server", "volume")))
    simulate.add_argument("--interval", type=int, default=300, help="seconds per sample")
    simulate.add_argument("--batch-size", type=int, default=1000)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--agent-prefix", default="sim")
    simulate.add_argument("--ground-truth", default="ground_truth.json")
    simulate.add_argument(
        "--tokens-file", help="JSON object agent_id -> bearer token (collector with auth)"
    )
    _store_option(simulate)
    simulate.set_defaults(handler=cmd_agent_simulate)

    token = agent_commands.add_parser("token", help="issue or revoke agent bearer tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    issue = token_commands.add_parser(
        "issue", help="create a token for an agent and print it (only this once)"
    )
    issue.add_argument("agent_id")
    issue.add_argument(
        "--scope",
        required=True,
        help="resource ids the agent may report, comma separated, or '*' for all",
    )
    _store_option(issue)
    issue.set_defaults(handler=cmd_agent_token_issue)
    revoke = token_commands.add_parser("revoke", help="revoke every active token of an agent")
    revoke.add_argument("agent_id")
    _store_option(revoke)
    revoke.set_defaults(handler=cmd_agent_token_revoke)
    run = agent_commands.add_parser(
        "run",
        help="read this host's usage from /proc and statvfs, spool it, stream it to a collector",
    )
    run.add_argument("--target", required=True, help="collector host:port")
    run.add_argument("--agent-id", required=True)
    run.add_argument("--resource-id", required=True, help="the resource this host reports as")
    run.add_argument("--spool-dir", required=True, help="one directory per agent")
    run.add_argument("--interval", type=int, default=10, help="seconds between readings")
    run.add_argument("--token-file", help="file holding the agent's bearer token")
    run.add_argument(
        "--mount", action="append", help="mount point for storage.block.bytes (repeat; default /)"
    )
    run.add_argument("--max-spool-batches", type=int, default=10_000)
    run.add_argument("--max-spool-bytes", type=int, default=256 * 1024**2)
    run.set_defaults(handler=cmd_agent_run)

    from meterline import billing_cli

    sub = command(
        "close",
        billing_cli.scheduled_or(cmd_close),
        "close a billing period: draft invoices for every account",
    )
    sub.add_argument(
        "--period",
        help="YYYY-MM: per account, the period whose last local day (in the account's "
        "timezone) falls in that month",
    )
    sub.add_argument("--now", type=_instant, help="the clock (default: now)")
    sub.add_argument("--format", choices=("text", "json"), default="text")
    sub.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="processes rating the accounts, in contiguous shards by account id (default: "
        "the CPU count, at most 8; 1 = in this process); the output is the same",
    )
    _store_option(sub)
    billing_cli.add_scheduler_options(sub)
    billing_cli.register(commands, command, _store_option, _kafka_option)
    from meterline import usage_cli

    usage_cli.register(command, _store_option)

    sub = command("demo", cmd_demo, "the whole pipeline on embedded defaults, one month")
    sub.add_argument("--workdir", default="var/demo")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from aggregation.ports import IssuedInvoiceError
    from invoicer.close import PeriodNotClosableError
    from meterline.wiring import NoCatalogError
    from rating.catalog_file import CatalogError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CatalogError as exc:
        print(f"catalog rejected, nothing applied:\n{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (UsageError, ValueError) as exc:
        print(f"meterline: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (PeriodNotClosableError, IssuedInvoiceError, NoCatalogError) as exc:
        print(f"meterline: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
