-- Least privilege: every process logs in as a role of its own (`agentworks migrate` makes the
-- roles below LOGIN, with passwords from settings), and the events table, like the read models,
-- shows the API role only the workspace set for its transaction.
--
--   agentworks_app        the write side: INSERT/SELECT events, snapshots and command records
--   agentworks_projector  read models (owner); SELECT events
--   agentworks_api        read models and events of `agentworks.workspace_id` only (RLS)
--   agentworks_relay      SELECT events; its own position in relay_positions

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentworks_relay') THEN
        CREATE ROLE agentworks_relay NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created by a concurrent migration of another database on this cluster
END
$$;

-- The relay used the write side's role; now it has its own, and the writer loses what only
-- the relay needed.
GRANT SELECT ON agentworks_events TO agentworks_relay;
GRANT SELECT, INSERT, UPDATE ON relay_positions TO agentworks_relay;
GRANT SELECT ON projection_positions TO agentworks_relay;
REVOKE ALL ON relay_positions, projection_positions FROM agentworks_app;

-- Which workspace an event belongs to, copied by the recorder from the event's metadata; NULL
-- for an event that names none (the API role never sees such events).
ALTER TABLE agentworks_events ADD COLUMN workspace_id uuid;

-- Existing events get theirs from their stored state, once. The immutability trigger is off
-- for this statement only: it fills the new derived column and changes nothing an event says.
CREATE FUNCTION pg_temp.stored_workspace(state bytea) RETURNS uuid
    LANGUAGE plpgsql IMMUTABLE AS
$$
BEGIN
    RETURN (convert_from(state, 'UTF8')::jsonb #>> '{meta,workspace_id}')::uuid;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;
ALTER TABLE agentworks_events DISABLE TRIGGER agentworks_events_immutable;
UPDATE agentworks_events SET workspace_id = pg_temp.stored_workspace(state);
ALTER TABLE agentworks_events ENABLE TRIGGER agentworks_events_immutable;

-- Row-level security on the log. The owner (who runs migrations) is not subject to it; every
-- other role sees only what a policy grants it.
ALTER TABLE agentworks_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY writer_reads ON agentworks_events FOR SELECT TO agentworks_app USING (true);
CREATE POLICY writer_appends ON agentworks_events FOR INSERT TO agentworks_app WITH CHECK (true);
CREATE POLICY log_readers ON agentworks_events FOR SELECT
    TO agentworks_projector, agentworks_relay USING (true);
CREATE POLICY tenant_isolation ON agentworks_events FOR SELECT TO agentworks_api
    USING (workspace_id = nullif(current_setting('agentworks.workspace_id', true), '')::uuid);

-- The log head (readiness, lag metrics) without showing the API any event.
CREATE FUNCTION agentworks_log_head() RETURNS bigint
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp AS
$$
    SELECT coalesce(max(notification_id), 0) FROM public.agentworks_events
$$;
REVOKE ALL ON FUNCTION agentworks_log_head() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentworks_log_head()
    TO agentworks_app, agentworks_api, agentworks_projector, agentworks_relay;
