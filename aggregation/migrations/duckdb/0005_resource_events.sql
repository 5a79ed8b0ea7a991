-- Meterline store, version 5 (DuckDB): resource lifecycle events, from which the
-- resource_spans of a resource are derived (rating/lifecycle.py). Key: (resource_id,
-- event_id): an event delivered again changes nothing. plan_id / subscription_id are ''
-- when the event names none.
CREATE TABLE resource_events (
    resource_id     VARCHAR     NOT NULL,
    event_id        VARCHAR     NOT NULL,
    kind            VARCHAR     NOT NULL,
    plan_id         VARCHAR     NOT NULL,
    subscription_id VARCHAR     NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    agent_id        VARCHAR     NOT NULL,
    received_at     TIMESTAMPTZ NOT NULL,
    stored_at       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (resource_id, event_id),
    CHECK (kind IN ('created', 'resized', 'moved', 'deleted'))
);
