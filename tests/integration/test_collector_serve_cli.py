"""`meterline collector serve` as operators run it: a separate process with auth, the store
refresh loop, the /metrics endpoint and a graceful stop on SIGTERM (real broker, real
PostgreSQL; tokens issued and revoked with the CLI)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from collectors.auth import bearer_metadata
from meterline.cli import main
from meterline.embedded_broker import free_port
from meterline_proto.agent.v1 import agent_pb2
from tests.fixtures.kafka import TopicFactory
from tests.integration.test_collector_auth import CATALOG, UnaryMethod, batch, row

pytestmark = pytest.mark.integration

SUBMIT = "/meterline.agent.v1.IngestService/SubmitBatch"
WAIT_S = 30.0  # upper bound for the process to come up / pick up a revocation


def submit(target: str, payload: bytes, token: str | None) -> agent_pb2.BatchAck:
    async def call() -> agent_pb2.BatchAck:
        async with grpc.aio.insecure_channel(target) as channel:
            method: UnaryMethod = channel.unary_unary(SUBMIT, None, agent_pb2.BatchAck.FromString)
            metadata = bearer_metadata(token) if token is not None else None
            ack = await method(payload, metadata=metadata, timeout=10)
            assert isinstance(ack, agent_pb2.BatchAck)
            return ack

    return asyncio.run(call())


def status_of(target: str, payload: bytes, token: str | None) -> grpc.StatusCode:
    try:
        submit(target, payload, token)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


@pytest.fixture
def serving(
    pg_url: str, kafka_bootstrap: str, topic: TopicFactory, tmp_path: Path
) -> Iterator[tuple[str, int, subprocess.Popen[bytes]]]:
    assert main(["catalog", "apply", str(CATALOG), "--store", pg_url]) == 0
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "METERLINE_USAGE_TOPIC": topic("usage"),
        "METERLINE_REJECTS_TOPIC": topic("rejects"),
        "METERLINE_COLLECTOR_REFRESH_S": "0.2",
    }
    log = (tmp_path / "collector.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meterline.cli",
            "collector",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            pg_url,
            "--kafka",
            kafka_bootstrap,
            "--metrics-port",
            str(metrics_port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + WAIT_S
        while status_of(target, b"", None) is grpc.StatusCode.UNAVAILABLE:
            assert process.poll() is None, (tmp_path / "collector.log").read_text()
            assert time.monotonic() < deadline, "the collector did not come up"
            time.sleep(0.1)
        yield target, metrics_port, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


def test_serve_authenticates_refreshes_revocations_exposes_metrics_and_stops_on_sigterm(
    serving: tuple[str, int, subprocess.Popen[bytes]],
    pg_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target, metrics_port, process = serving
    capsys.readouterr()
    assert main(["agent", "token", "issue", "agent-1", "--scope", "srv-1", "--store", pg_url]) == 0
    token = capsys.readouterr().out.strip()

    # The new token is picked up by the refresh loop.
    deadline = time.monotonic() + WAIT_S
    while status_of(target, batch([row("srv-1")], seq=1), token) is not grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the issued token was never accepted"
        time.sleep(0.1)
    ack = submit(target, batch([row("srv-1"), row("srv-2")], seq=2), token)
    assert ack.accepted_count == 1
    assert [r.code for r in ack.rejections] == [agent_pb2.FORBIDDEN_RESOURCE]
    assert status_of(target, batch([row("srv-1")], seq=3), None) is grpc.StatusCode.UNAUTHENTICATED

    assert main(["agent", "token", "revoke", "agent-1", "--store", pg_url]) == 0
    deadline = time.monotonic() + WAIT_S
    while status_of(target, batch([row("srv-1")], seq=4), token) is grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the revoked token kept working"
        time.sleep(0.1)
    assert status_of(target, batch([row("srv-1")], seq=4), token) is grpc.StatusCode.UNAUTHENTICATED

    metrics = scrape(metrics_port)
    assert 'meterline_collector_samples_rejected_total{code="FORBIDDEN_RESOURCE"} 1.0' in metrics
    assert 'meterline_collector_auth_failures_total{reason="missing"}' in metrics

    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT_S) == 0
