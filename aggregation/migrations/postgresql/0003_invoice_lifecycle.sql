-- Meterline store, version 3: the invoice lifecycle (BILLING-SEMANTICS §10, §11).
--
-- invoice_sequences: one gapless counter per numbering series ("ML-2026"). The counter row
-- is updated in the same transaction that flips an invoice to issued, so a rolled-back or
-- crashed issue leaves neither a gap nor a duplicate; concurrent issuers queue on the row.
CREATE TABLE invoice_sequences (
    series      text COLLATE "C" PRIMARY KEY,
    last_number bigint           NOT NULL CHECK (last_number >= 1)
);

-- The number each issued invoice got; (series, seq) and number are unique.
CREATE TABLE invoice_numbers (
    invoice_key text COLLATE "C" PRIMARY KEY,
    series      text COLLATE "C" NOT NULL,
    seq         bigint           NOT NULL CHECK (seq >= 1),
    number      text COLLATE "C" NOT NULL UNIQUE,
    issued_at   timestamptz      NOT NULL,
    UNIQUE (series, seq)
);

-- Transactional outbox of billing events (invoice.issued): written with the issue, published
-- to Kafka afterwards, then marked. A crash between publish and mark publishes the same
-- event_id again; consumers dedupe by event_id.
CREATE TABLE billing_outbox (
    event_id     text COLLATE "C" PRIMARY KEY,
    topic        text COLLATE "C" NOT NULL,
    kafka_key    text             NOT NULL,
    value        text             NOT NULL,
    created_at   timestamptz      NOT NULL,
    published_at timestamptz
);
CREATE INDEX billing_outbox_pending_idx ON billing_outbox (created_at, event_id)
    WHERE published_at IS NULL;
CREATE INDEX invoices_period_end_idx ON invoices (period_end);

-- Which hours each batch added to (written by write_rated with the ledger row), so that
-- `meterline explain` can walk from an invoice line's hours to the source batches and their
-- Kafka offsets. No primary key: the ledger already makes each batch count once.
CREATE TABLE batch_usage (
    agent_id        text COLLATE "C" NOT NULL,
    seq             bigint           NOT NULL,
    subscription_id text COLLATE "C" NOT NULL,
    meter           text COLLATE "C" NOT NULL,
    hour_start      timestamptz      NOT NULL
);
CREATE INDEX batch_usage_hour_idx ON batch_usage (subscription_id, meter, hour_start);
