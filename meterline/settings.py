"""Settings: one frozen object, from METERLINE_* environment variables or CLI flags."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERLINE_", frozen=True, extra="forbid")

    store_url: str = Field(
        default="duckdb:///var/meterline.duckdb",
        description="postgresql://... (PostgreSQL/TimescaleDB) or duckdb:///path (embedded)",
    )
    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="bootstrap.servers")
    usage_topic: str = "usage.samples.v1"
    deadletter_topic: str = "usage.deadletter.v1"
    consumer_group: str = "meterline-rating"
    collector_listen: str = Field(default="127.0.0.1:50051", description="host:port for gRPC")
    collector_id: str = "collector-1"
    rejects_topic: str = Field(default="usage.rejects.v1", description="rejected samples")
    collector_refresh_s: float = Field(
        default=10.0, gt=0, le=3600, description="re-read catalog and agent tokens, seconds"
    )
    collector_max_in_flight_batches_per_process: int = Field(default=4096, ge=1, le=1_000_000)
    collector_metrics_host: str = Field(default="127.0.0.1", description="/metrics bind address")
    rating_max_records_per_poll: int = Field(default=500, ge=1, le=100_000)
    rating_archive_dir: str | None = Field(
        default=None,
        description="raw-batch archive (Parquet) the rating worker writes; None: no archive",
    )
    rating_group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "group.instance.id of this rating worker (static consumer-group membership; "
            "unique per worker, stable across its restarts). Set it with the embedded "
            "noida-db broker: it never evicts a killed dynamic member, whose partitions "
            "then stay assigned to it and are not rated until the group is recreated. "
            "None: dynamic membership"
        ),
    )
    billing_events_topic: str = Field(default="billing.events.v1", description="invoice.issued")
    invoice_issuer: str = Field(default="ML", description="invoice number series prefix")
