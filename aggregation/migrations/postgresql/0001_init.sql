-- Meterline store, version 1 (PostgreSQL >= 15; TimescaleDB-compatible: every key that a
-- hypertable would partition on is part of its table's primary key).
-- Identifiers compare and sort bytewise (COLLATE "C") so that PostgreSQL and DuckDB agree.

-- The catalog as applied: an opaque, versioned document. The store never interprets it.
CREATE TABLE catalog_versions (
    version    integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    document   text        NOT NULL,
    digest     text        NOT NULL,
    source     text        NOT NULL,
    applied_at timestamptz NOT NULL
);

-- The dedup ledger: one row per batch counted, keyed by the identity the agent gave it.
CREATE TABLE batch_ledger (
    agent_id     text COLLATE "C" NOT NULL,
    seq          bigint           NOT NULL,
    topic        text COLLATE "C" NOT NULL,
    partition    integer          NOT NULL,
    "offset"     bigint           NOT NULL,
    received_at  timestamptz      NOT NULL,
    sample_count bigint           NOT NULL CHECK (sample_count >= 0),
    rated_at     timestamptz      NOT NULL,
    PRIMARY KEY (agent_id, seq)
);

-- Kafka offsets stored with the effects they cover (written in the same transaction).
CREATE TABLE consumer_offsets (
    group_id    text COLLATE "C" NOT NULL,
    topic       text COLLATE "C" NOT NULL,
    partition   integer          NOT NULL,
    next_offset bigint           NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz      NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);

-- Exact usage per (subscription, meter, UTC hour). Quantities are integers in the meter's
-- base unit; numeric(38,0) so that sums of int64 samples never overflow.
CREATE TABLE usage_hourly (
    subscription_id text COLLATE "C" NOT NULL,
    meter           text COLLATE "C" NOT NULL,
    hour_start      timestamptz      NOT NULL,
    quantity        numeric(38, 0)   NOT NULL,
    quantity_max    numeric(38, 0)   NOT NULL,
    sample_count    bigint           NOT NULL CHECK (sample_count >= 0),
    updated_at      timestamptz      NOT NULL,
    PRIMARY KEY (subscription_id, meter, hour_start)
);
CREATE INDEX usage_hourly_hour_start_idx ON usage_hourly (hour_start);

-- Invoices as the invoicer rendered them; an issued invoice never changes.
CREATE TABLE invoices (
    key          text COLLATE "C" PRIMARY KEY,
    account_id   text COLLATE "C" NOT NULL,
    period_start timestamptz      NOT NULL,
    period_end   timestamptz      NOT NULL,
    currency     text             NOT NULL,
    status       text             NOT NULL CHECK (status IN ('draft', 'issued')),
    total_minor  bigint           NOT NULL,
    document     text             NOT NULL,
    updated_at   timestamptz      NOT NULL,
    CHECK (period_end > period_start)
);
CREATE INDEX invoices_period_start_idx ON invoices (period_start);
