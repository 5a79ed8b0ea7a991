"""The Kafka adapter of the invoicer's ``BillingEventSink`` port (``billing.events.v1``).

The invoicer never imports Kafka (import-linter contract); the composition root wires this
adapter in. An idempotent producer (``acks=all``); ``publish`` returns only once Kafka
confirmed every record and raises ``BillingEventPublishError`` otherwise, so the caller
marks outbox rows published only after they are really in Kafka. Each record's key is the
account id (one partition per account keeps its events in order) and carries the event id
in the ``meterline.event_id`` header as well as in the JSON value.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from confluent_kafka import KafkaError, KafkaException, Producer

from aggregation.ports import BillingEvent

log = logging.getLogger(__name__)

EVENT_ID_HEADER = "meterline.event_id"
_QUEUE_FULL_RETRIES = 100


class BillingEventPublishError(RuntimeError):
    """Kafka did not confirm every event; none should be marked published."""


class KafkaBillingEventSink:
    def __init__(
        self,
        bootstrap: str,
        *,
        timeout_s: float = 30.0,
        extra_config: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        if not 0 < timeout_s <= 600:
            raise ValueError(f"timeout_s must be in (0, 600], got {timeout_s}")
        self.timeout_s = timeout_s
        config: dict[str, str | int | float | bool] = {
            "bootstrap.servers": bootstrap,
            "client.id": "meterline-invoicer",
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": int(timeout_s * 1000),
        }
        config.update(extra_config or {})
        self._producer = Producer({**config, "logger": log})

    def publish(self, events: Sequence[BillingEvent]) -> None:
        failures: list[str] = []

        def on_delivery(error: KafkaError | None, _message: object) -> None:
            if error is not None:
                failures.append(str(error))

        for event in events:
            for _ in range(_QUEUE_FULL_RETRIES):
                try:
                    self._producer.produce(
                        event.topic,
                        value=event.value.encode(),
                        key=event.key.encode(),
                        headers=[(EVENT_ID_HEADER, event.event_id.encode())],
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    self._producer.poll(0.1)
                except KafkaException as exc:
                    raise BillingEventPublishError(
                        f"Kafka refused event {event.event_id!r} on {event.topic!r}: {exc}"
                    ) from None
            else:
                raise BillingEventPublishError("the producer queue stayed full")
        remaining = self._producer.flush(self.timeout_s)
        if remaining:
            raise BillingEventPublishError(
                f"{remaining} billing events not confirmed by Kafka within {self.timeout_s} s"
            )
        if failures:
            raise BillingEventPublishError(
                f"{len(failures)} billing events not written: {failures[0]}"
            )

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.flush(timeout_s)
