"""A Kafka-protocol broker the project starts itself: ``noida-db`` from PyPI, Kafka only.

Used by the embedded default (``meterline demo``) and by the test fixtures. Production
points every component at a real Kafka cluster instead. Measured behaviour and gotchas
of this broker are in ``shared/design/ENVIRONMENT.md``: it ignores fetch size limits, so
consumers set ``receive.message.max.bytes`` high.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from types import TracebackType

from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class BrokerStartError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _binary() -> Path:
    path = Path(str(files("noida_db").joinpath("noida-db")))
    if not path.is_file():
        raise BrokerStartError(f"noida-db binary not found at {path}; is noida-db installed?")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


class EmbeddedBroker:
    """Start with ``with EmbeddedBroker(data_dir) as broker: broker.bootstrap``."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = data_dir / "broker.log"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (benchmarks pin it to a CPU)."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(_binary()), "start", "--data-dir", str(self.data_dir), "--only", "kafka",
            "--host", self.host, "--kafka-port", str(self.port),
        ]  # fmt: skip
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerStartError(
                    f"noida-db exited with {self._process.returncode}; log: {self._log_path}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerStartError(f"noida-db did not listen on {self.bootstrap} in time")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would; data already stored survives."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT_S)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def create_topics(
    bootstrap: str, names: Sequence[str], partitions: int = 4, timeout_s: float = 10.0
) -> None:
    """Create topics that do not exist yet (existing ones are left as they are)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
    missing = [t for t in wanted if t.topic not in existing]
    if not missing:
        return
    for future in admin.create_topics(missing, operation_timeout=timeout_s).values():
        future.result(timeout_s)
