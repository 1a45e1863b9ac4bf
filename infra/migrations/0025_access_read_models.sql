-- A workspace's API keys and invitations as read models (`Workspace.apiKeys`,
-- `Workspace.invitations`), so an admin can find a stale key or the id of an invitation to
-- revoke without the API loading aggregates from the event store per request.
--
-- Projected by the kanban projector from the ApiKey and Invitation events (the projector that
-- owns workspaces and members); rebuilt with it. No secret and no digest of one is kept here:
-- the events' `secret_hash` and `token_hash` stay in the event store.
--
-- The lists are read newest first, one workspace at a time, live keys (or pending invitations)
-- by default: the partial indexes serve those, the full ones a list that includes the rest.
CREATE TABLE rm_api_keys (
    workspace_id uuid NOT NULL,
    key_id uuid PRIMARY KEY,
    name text NOT NULL,
    role text NOT NULL,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX rm_api_keys_newest_idx ON rm_api_keys (workspace_id, created_at DESC, key_id DESC);
CREATE INDEX rm_api_keys_live_idx ON rm_api_keys (workspace_id, created_at DESC, key_id DESC)
    WHERE revoked_at IS NULL;

CREATE TABLE rm_invitations (
    workspace_id uuid NOT NULL,
    invitation_id uuid PRIMARY KEY,
    email text NOT NULL,
    role text NOT NULL,
    invited_by text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    accepted_by text,
    accepted_at timestamptz,
    revoked_at timestamptz
);
CREATE INDEX rm_invitations_newest_idx
    ON rm_invitations (workspace_id, created_at DESC, invitation_id DESC);
CREATE INDEX rm_invitations_open_idx
    ON rm_invitations (workspace_id, created_at DESC, invitation_id DESC)
    WHERE accepted_at IS NULL AND revoked_at IS NULL;

-- Row-level security by workspace, SELECT for the API, writes for the projector (0002).
SELECT agentworks_secure_read_model(t::regclass) FROM unnest(ARRAY[
    'rm_api_keys', 'rm_invitations'
]) AS t;
