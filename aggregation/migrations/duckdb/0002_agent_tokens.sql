-- Meterline store, version 2 (DuckDB): agent bearer tokens, stored only as the sha256 of the
-- token. scope is a JSON list of resource ids, or ["*"].
CREATE TABLE agent_tokens (
    token_hash VARCHAR     PRIMARY KEY,
    agent_id   VARCHAR     NOT NULL,
    scope      VARCHAR     NOT NULL,
    issued_at  TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ,
    CHECK (revoked_at IS NULL OR revoked_at >= issued_at)
);
