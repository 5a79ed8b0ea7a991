-- Meterline store, version 3 (DuckDB): the invoice lifecycle. Same tables and columns as the
-- PostgreSQL schema; see its comments.
CREATE TABLE invoice_sequences (
    series      VARCHAR PRIMARY KEY,
    last_number BIGINT  NOT NULL CHECK (last_number >= 1)
);

CREATE TABLE invoice_numbers (
    invoice_key VARCHAR     PRIMARY KEY,
    series      VARCHAR     NOT NULL,
    seq         BIGINT      NOT NULL CHECK (seq >= 1),
    number      VARCHAR     NOT NULL UNIQUE,
    issued_at   TIMESTAMPTZ NOT NULL,
    UNIQUE (series, seq)
);

CREATE TABLE billing_outbox (
    event_id     VARCHAR     PRIMARY KEY,
    topic        VARCHAR     NOT NULL,
    kafka_key    VARCHAR     NOT NULL,
    value        VARCHAR     NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    published_at TIMESTAMPTZ
);

-- Which hours each batch added to (see the PostgreSQL schema). No index: DuckDB's zone maps
-- serve the explain query, and inserts stay cheap.
CREATE TABLE batch_usage (
    agent_id        VARCHAR     NOT NULL,
    seq             BIGINT      NOT NULL,
    subscription_id VARCHAR     NOT NULL,
    meter           VARCHAR     NOT NULL,
    hour_start      TIMESTAMPTZ NOT NULL
);
