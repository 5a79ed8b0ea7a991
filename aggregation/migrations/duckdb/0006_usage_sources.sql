-- Meterline store, version 6 (DuckDB): where usage came from, recorded per hour row and write
-- instead of per batch and hour row (see the PostgreSQL schema).

-- Each counted batch gets a surrogate key, assigned when its ledger row is inserted.
-- (agent_id, seq) stays the primary key. DuckDB cannot add a NOT NULL or UNIQUE column to a
-- table with rows inside a transaction, so the ledger is rebuilt with it; the rows already
-- there are numbered in the order they were rated.
CREATE SEQUENCE batch_ledger_batch_id_seq START 1;
CREATE TABLE batch_ledger_v6 (
    agent_id     VARCHAR     NOT NULL,
    seq          BIGINT      NOT NULL,
    topic        VARCHAR     NOT NULL,
    partition    INTEGER     NOT NULL,
    "offset"     BIGINT      NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    sample_count BIGINT      NOT NULL CHECK (sample_count >= 0),
    rated_at     TIMESTAMPTZ NOT NULL,
    batch_id     BIGINT      NOT NULL UNIQUE DEFAULT nextval('batch_ledger_batch_id_seq'),
    PRIMARY KEY (agent_id, seq)
);
INSERT INTO batch_ledger_v6
    (agent_id, seq, topic, partition, "offset", received_at, sample_count, rated_at)
SELECT agent_id, seq, topic, partition, "offset", received_at, sample_count, rated_at
FROM batch_ledger ORDER BY rated_at, agent_id, seq;
DROP TABLE batch_ledger;
ALTER TABLE batch_ledger_v6 RENAME TO batch_ledger;

-- The batches (batch_ledger.batch_id) that one write_rated call added to one usage_hourly row;
-- an hour row collects one row per call that touched it. No index (as batch_usage): DuckDB's
-- zone maps serve the explain query, and inserts stay cheap.
CREATE TABLE usage_sources (
    subscription_id VARCHAR     NOT NULL,
    meter           VARCHAR     NOT NULL,
    hour_start      TIMESTAMPTZ NOT NULL,
    batch_ids       BIGINT[]    NOT NULL
);

-- batch_usage (version 3) is no longer written; the rows older versions wrote there are still
-- read (explain, re-rating) until a re-rating of their hours replaces them by usage_sources.
