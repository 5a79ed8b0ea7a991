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
    rating_max_records_per_poll: int = Field(default=500, ge=1, le=100_000)
