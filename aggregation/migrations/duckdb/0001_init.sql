-- Meterline store, version 1 (DuckDB). Same tables and columns as the PostgreSQL schema;
-- DuckDB compares strings bytewise, as the PostgreSQL schema does with COLLATE "C".
-- The session TimeZone is UTC (set by the adapter on connect).

CREATE SEQUENCE catalog_versions_version_seq START 1;

-- The catalog as applied: an opaque, versioned document. The store never interprets it.
CREATE TABLE catalog_versions (
    version    INTEGER     PRIMARY KEY DEFAULT nextval('catalog_versions_version_seq'),
    document   VARCHAR     NOT NULL,
    digest     VARCHAR     NOT NULL,
    source     VARCHAR     NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL
);

-- The dedup ledger: one row per batch counted, keyed by the identity the agent gave it.
CREATE TABLE batch_ledger (
    agent_id     VARCHAR     NOT NULL,
    seq          BIGINT      NOT NULL,
    topic        VARCHAR     NOT NULL,
    partition    INTEGER     NOT NULL,
    "offset"     BIGINT      NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    sample_count BIGINT      NOT NULL CHECK (sample_count >= 0),
    rated_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (agent_id, seq)
);

-- Kafka offsets stored with the effects they cover (written in the same transaction).
CREATE TABLE consumer_offsets (
    group_id    VARCHAR     NOT NULL,
    topic       VARCHAR     NOT NULL,
    partition   INTEGER     NOT NULL,
    next_offset BIGINT      NOT NULL CHECK (next_offset >= 0),
    updated_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);

-- Exact usage per (subscription, meter, UTC hour), integers in the meter's base unit.
CREATE TABLE usage_hourly (
    subscription_id VARCHAR        NOT NULL,
    meter           VARCHAR        NOT NULL,
    hour_start      TIMESTAMPTZ    NOT NULL,
    quantity        DECIMAL(38, 0) NOT NULL,
    quantity_max    DECIMAL(38, 0) NOT NULL,
    sample_count    BIGINT         NOT NULL CHECK (sample_count >= 0),
    updated_at      TIMESTAMPTZ    NOT NULL,
    PRIMARY KEY (subscription_id, meter, hour_start)
);

-- Invoices as the invoicer rendered them; an issued invoice never changes.
CREATE TABLE invoices (
    key          VARCHAR     PRIMARY KEY,
    account_id   VARCHAR     NOT NULL,
    period_start TIMESTAMPTZ NOT NULL,
    period_end   TIMESTAMPTZ NOT NULL,
    currency     VARCHAR     NOT NULL,
    status       VARCHAR     NOT NULL CHECK (status IN ('draft', 'issued')),
    total_minor  BIGINT      NOT NULL,
    document     VARCHAR     NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    CHECK (period_end > period_start)
);
