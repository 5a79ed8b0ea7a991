-- Meterline store, version 5 (PostgreSQL): resource lifecycle events, from which the
-- resource_spans of a resource are derived (rating/lifecycle.py). Key: (resource_id,
-- event_id): an event delivered again changes nothing. plan_id / subscription_id are ''
-- when the event names none. Few rows (a handful per resource over its life): a plain table.
CREATE TABLE resource_events (
    resource_id     text COLLATE "C" NOT NULL,
    event_id        text COLLATE "C" NOT NULL,
    kind            text             NOT NULL,
    plan_id         text COLLATE "C" NOT NULL,
    subscription_id text COLLATE "C" NOT NULL,
    occurred_at     timestamptz      NOT NULL,
    agent_id        text COLLATE "C" NOT NULL,
    received_at     timestamptz      NOT NULL,
    stored_at       timestamptz      NOT NULL,
    PRIMARY KEY (resource_id, event_id),
    CHECK (kind IN ('created', 'resized', 'moved', 'deleted'))
);
