-- Meterline store, version 4 (DuckDB): resource_spans. PostgreSQL partitions usage_hourly
-- and resource_spans by time here (hypertables on TimescaleDB, monthly range partitions
-- otherwise); DuckDB has no such partitioning, and needs none for an embedded store.

-- Which subscription and plan a resource belonged to, from span_start until span_end
-- (half-open; NULL: still open).
CREATE TABLE resource_spans (
    resource_id     VARCHAR     NOT NULL,
    subscription_id VARCHAR     NOT NULL,
    plan_id         VARCHAR     NOT NULL,
    span_start      TIMESTAMPTZ NOT NULL,
    span_end        TIMESTAMPTZ,
    PRIMARY KEY (resource_id, span_start),
    CHECK (span_end IS NULL OR span_end > span_start)
);
