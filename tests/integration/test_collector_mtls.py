"""Mutual TLS on the collector, with certificates made by the ``openssl`` command-line tool.

Given a collector that requires client certificates signed by a test CA, a client without a
certificate and a client whose certificate another CA signed are refused at the handshake
(nothing reaches Kafka), and a client with a certificate of the right CA gets its lifecycle
events acked after Kafka confirmed them.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from collectors.auth import AgentCredential, Authenticator, bearer_metadata, hash_token
from collectors.directory import Directory
from collectors.grpc_agent import ClientTls, open_channel
from collectors.grpc_server import CollectorServer, ServerTls
from collectors.ingest import Ingestor, IngestSettings
from collectors.kafka_sink import KafkaSink
from meterline_proto.agent.v1 import agent_pb2, agent_pb2_grpc
from meterline_proto.usage.v1 import lifecycle_pb2
from tests.fixtures.kafka import TopicFactory

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool"),
]

NOW = datetime(2026, 11, 1, tzinfo=UTC)
TOKEN = "mtls-test-token"
DIRECTORY = Directory(meters={}, resource_ids=frozenset({"srv-1"}), plan_ids=frozenset({"p"}))
BATCH = agent_pb2.LifecycleBatch(
    agent_id="agent-1",
    events=[
        lifecycle_pb2.LifecycleEvent(
            event_id="e-1",
            resource_id="srv-1",
            kind=lifecycle_pb2.CREATED,
            plan_id="p",
            occurred_at_unix_s=int(NOW.timestamp()) - 3600,
        )
    ],
)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def new_key_and_csr(name: str, cn: str, cwd: Path) -> None:
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=cwd,
    )  # fmt: skip


def new_ca(name: str, cwd: Path) -> None:
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        cwd=cwd,
    )  # fmt: skip


def sign(name: str, ca: str, extensions: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


@dataclass(frozen=True)
class Pki:
    root: Path

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    new_ca("ca", root)
    new_ca("rogue-ca", root)
    new_key_and_csr("server", "localhost", root)
    sign("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n", root)
    for name, ca in (("agent", "ca"), ("rogue", "rogue-ca")):
        new_key_and_csr(name, name, root)
        sign(name, ca, "extendedKeyUsage=clientAuth\n", root)
    return Pki(root)


def test_only_clients_with_a_certificate_of_the_ca_get_through(
    kafka_bootstrap: str, topic: TopicFactory, pki: Pki
) -> None:
    lifecycle = topic("lifecycle")
    server_ca = pki.read("ca.pem")
    clients = {
        "no certificate": ClientTls(server_ca),
        "another CA": ClientTls(server_ca, pki.read("rogue.pem"), pki.read("rogue.key")),
        "the CA": ClientTls(server_ca, pki.read("agent.pem"), pki.read("agent.key")),
    }

    async def scenario() -> dict[str, grpc.StatusCode | int]:
        sink = KafkaSink(kafka_bootstrap)
        ingestor = Ingestor(
            DIRECTORY,
            sink,
            IngestSettings(
                collector_id="mtls",
                topic=topic("usage"),
                rejects_topic=topic("rejects"),
                lifecycle_topic=lifecycle,
            ),
            lambda: NOW,
            authenticator=Authenticator([AgentCredential(hash_token(TOKEN), "agent-1", ("*",))]),
        )
        tls = ServerTls(pki.read("server.pem"), pki.read("server.key"), client_ca=server_ca)
        server = CollectorServer(ingestor, tls=tls)
        port = await server.start()
        outcomes: dict[str, grpc.StatusCode | int] = {}
        try:
            for name, client in clients.items():
                async with open_channel(f"127.0.0.1:{port}", client) as channel:
                    stub = agent_pb2_grpc.IngestServiceStub(channel)
                    try:
                        ack = await stub.SendLifecycleEvents(
                            BATCH, metadata=bearer_metadata(TOKEN), timeout=10
                        )
                        outcomes[name] = ack.accepted_count
                    except grpc.aio.AioRpcError as exc:
                        outcomes[name] = exc.code()
        finally:
            await server.stop(None)
            sink.close(5.0)
        return outcomes

    assert asyncio.run(scenario()) == {
        "no certificate": grpc.StatusCode.UNAVAILABLE,
        "another CA": grpc.StatusCode.UNAVAILABLE,
        "the CA": 1,
    }


def test_client_tls_wants_both_certificate_and_key() -> None:
    with pytest.raises(ValueError, match="both"):
        ClientTls(b"ca", certificate_chain=b"cert")
