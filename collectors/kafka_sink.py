"""The Kafka producer of the collector (the only module importing ``confluent_kafka``).

An idempotent producer (``enable.idempotence=true``, ``acks=all``) whose ``send`` resolves
only when the broker confirmed the record, and raises :class:`SinkError` when it did not.
librdkafka calls delivery reports from ``poll()``; a background thread polls, collects the
reports of one ``poll()`` and settles their asyncio futures with one
``loop.call_soon_threadsafe`` per poll (not one per record: each wakes the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from collectors.ports import SinkError

_log = logging.getLogger(__name__)

# (the loop of the sender, its future, the topic) of one record awaiting its report
_Pending = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]", str]

POLL_INTERVAL_S = 0.05
MESSAGE_TIMEOUT_MS_MAXIMUM = 300_000
LINGER_MS_MAXIMUM = 1_000
QUEUE_FULL_RETRY_S = 0.005


class KafkaSink:
    """``await sink.send(topic, key, value)`` returns once the record is in Kafka.

    ``message_timeout_ms`` bounds how long one record may wait for the broker (librdkafka
    retries internally until then); afterwards ``send`` raises :class:`SinkError`.
    ``extra_config`` is merged last (for example ``compression.type``, or TLS/SASL settings);
    it may not turn idempotence or ``acks=all`` off.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        client_id: str = "meterline-collector",
        message_timeout_ms: int = 30_000,
        linger_ms: int = 5,
        max_record_bytes: int = 8 * 1024 * 1024,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not 1 <= message_timeout_ms <= MESSAGE_TIMEOUT_MS_MAXIMUM:
            raise ValueError(
                f"message_timeout_ms must be in [1, {MESSAGE_TIMEOUT_MS_MAXIMUM}], "
                f"got {message_timeout_ms}"
            )
        if not 0 <= linger_ms <= LINGER_MS_MAXIMUM:
            raise ValueError(f"linger_ms must be in [0, {LINGER_MS_MAXIMUM}], got {linger_ms}")
        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "client.id": client_id,
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": message_timeout_ms,
            "linger.ms": linger_ms,
            "message.max.bytes": max_record_bytes,
            "error_cb": self._on_error,
            "logger": _log,
        }
        for key, value in (extra_config or {}).items():
            if key in {"enable.idempotence", "acks"}:
                raise ValueError(f"extra_config may not override {key!r}")
            config[key] = value
        self.message_timeout_ms = message_timeout_ms
        self._producer = Producer(config)
        self._fatal: str | None = None
        self._closed = False
        # Delivery reports served by the current poll()/flush(), settled in one hop per loop.
        self._reports: list[tuple[_Pending, KafkaError | None]] = []
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="kafka-sink-poll", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(POLL_INTERVAL_S)
            self._dispatch()

    def _on_delivery(self, pending: _Pending, err: KafkaError | None, _msg: Message) -> None:
        # Called by librdkafka inside poll()/flush(), on the thread calling them (the poller,
        # or close() once the poller stopped): never two threads at once.
        self._reports.append((pending, err))

    def _dispatch(self) -> None:
        """Hand the reports collected by the last poll to their event loops, one
        ``call_soon_threadsafe`` per loop."""
        if not self._reports:
            return
        reports, self._reports = self._reports, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, KafkaError | None]]] = {}
        for report in reports:  # per delivery report (a record of ~a batch), not per sample
            by_loop.setdefault(report[0][0], []).append(report)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, items)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err.str()
            _log.error("fatal Kafka producer error: %s", err.str())
        else:
            _log.warning("Kafka producer error: %s", err.str())

    def submit(self, topic: str, key: bytes, value: bytes) -> asyncio.Future[None] | None:
        """Produce one record now; the future resolves when the broker acknowledged it
        (acks=all) or fails with :class:`SinkError`. None: the local queue is full (nothing
        was produced; ``send`` waits and retries). Call it on the event loop."""
        if self._closed:
            raise SinkError("the Kafka sink is closed")
        if self._fatal is not None:
            raise SinkError(f"the Kafka producer failed fatally: {self._fatal}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        try:
            self._producer.produce(
                topic,
                value=value,
                key=key,
                on_delivery=functools.partial(self._on_delivery, (loop, future, topic)),
            )
        except BufferError:  # local queue full
            return None
        except KafkaException as exc:
            raise SinkError(f"Kafka refused the record on {topic!r}: {exc}") from None
        return future

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        """Produce one record; return when the broker acknowledged it (acks=all)."""
        deadline = time.monotonic() + self.message_timeout_ms / 1000
        while (future := self.submit(topic, key, value)) is None:  # bounded by the timeout
            if time.monotonic() >= deadline:
                raise SinkError("the Kafka producer queue stayed full")
            await asyncio.sleep(QUEUE_FULL_RETRY_S)  # wait for deliveries to drain it
        await future

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush what is queued (up to ``timeout_s``), then fail whatever is left.

        Returns the number of records that were not delivered (their ``send`` raised).
        Blocking: call it from a thread or at shutdown.
        """
        if self._closed:
            return 0
        self._closed = True
        self._stop.set()
        self._poller.join()
        remaining = self._producer.flush(timeout_s)
        if remaining:
            self._producer.purge()
            self._producer.flush(0)  # serve the delivery reports of the purged records
        self._dispatch()
        return remaining


def _settle(items: list[tuple[_Pending, KafkaError | None]]) -> None:
    """On the event loop: resolve the futures of a poll's delivery reports."""
    for (_loop, future, topic), err in items:
        if future.done():  # the sender gave up (cancelled)
            continue
        if err is None:
            future.set_result(None)
        else:
            future.set_exception(
                SinkError(f"Kafka did not confirm the record on {topic!r}: {err.str()}")
            )
