-- When each API key was last used (API.md `ApiKey.lastUsedAt`), so operators can find stale keys.
--
-- Not a read model and not in the event log: a use is no decision of the domain, and a busy key
-- makes thousands of requests a minute. The API writes a key's row itself, at most once per key
-- per interval (read_api.key_uses), so rebuilds leave this table alone and it cannot be rebuilt.
-- A revoked key keeps its row: its last use stays visible.
--
-- The API role writes it under row-level security like its reads: only rows of the workspace
-- set for its transaction (`agentworks.workspace_id`), which the API sets to the key's own. The
-- owner (who migrates, an operator) is not subject to it and sees every row.
CREATE TABLE api_key_uses (
    key_id uuid PRIMARY KEY,
    workspace_id uuid NOT NULL,
    last_used_at timestamptz NOT NULL
);
ALTER TABLE api_key_uses ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_key_uses FOR ALL TO agentworks_api
    USING (workspace_id = nullif(current_setting('agentworks.workspace_id', true), '')::uuid)
    WITH CHECK (workspace_id = nullif(current_setting('agentworks.workspace_id', true), '')::uuid);
REVOKE ALL ON api_key_uses FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON api_key_uses TO agentworks_api;
