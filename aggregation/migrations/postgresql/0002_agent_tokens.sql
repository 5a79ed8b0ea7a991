-- Meterline store, version 2: agent bearer tokens, stored only as the sha256 of the token.
-- The store never sees a token itself. scope is a JSON list of resource ids, or ["*"].
CREATE TABLE agent_tokens (
    token_hash text COLLATE "C" PRIMARY KEY,
    agent_id   text COLLATE "C" NOT NULL,
    scope      text             NOT NULL,
    issued_at  timestamptz      NOT NULL,
    revoked_at timestamptz,
    CHECK (revoked_at IS NULL OR revoked_at >= issued_at)
);
CREATE INDEX agent_tokens_agent_id_idx ON agent_tokens (agent_id);
