-- The event store: the only source of truth. Column layout follows the eventsourcing library's
-- postgres recorder (so its notification API works unchanged) plus `transaction_id`, which lets
-- readers tail by position without the library's table lock (see adapters/eventstore.py).

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentworks_app') THEN
        CREATE ROLE agentworks_app NOLOGIN;
    END IF;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT agentworks_app TO %I', current_user);
EXCEPTION WHEN others THEN
    RAISE NOTICE 'could not grant agentworks_app to %: %', current_user, SQLERRM;
END
$$;

CREATE TYPE stored_event_uuid AS (
    originator_id uuid,
    originator_version bigint,
    topic text,
    state bytea
);

CREATE TABLE agentworks_events (
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    topic text NOT NULL,
    state bytea NOT NULL,
    notification_id bigserial NOT NULL,
    transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (originator_id, originator_version)
);
CREATE UNIQUE INDEX agentworks_events_notification_id_idx
    ON agentworks_events (notification_id);

CREATE TABLE agentworks_snapshots (
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    topic text NOT NULL,
    state bytea NOT NULL,
    PRIMARY KEY (originator_id, originator_version)
);

CREATE FUNCTION agentworks_refuse_event_change() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'stored events are immutable: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'record a compensating event instead';
END
$$;

CREATE TRIGGER agentworks_events_immutable
    BEFORE UPDATE OR DELETE ON agentworks_events
    FOR EACH ROW EXECUTE FUNCTION agentworks_refuse_event_change();
CREATE TRIGGER agentworks_events_no_truncate
    BEFORE TRUNCATE ON agentworks_events
    FOR EACH STATEMENT EXECUTE FUNCTION agentworks_refuse_event_change();

-- Idempotency: one row per accepted command, written in the same transaction as its events.
-- `scope` is the workspace of the caller's credentials ('*' for bootstrap), so one tenant can
-- never read another's results by guessing a command id.
CREATE TABLE command_log (
    scope text NOT NULL,
    command_id uuid NOT NULL,
    command_type text NOT NULL,
    fingerprint text NOT NULL,
    actor text NOT NULL,
    result jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (scope, command_id)
);

REVOKE ALL ON agentworks_events, agentworks_snapshots, command_log FROM PUBLIC;
GRANT SELECT, INSERT ON agentworks_events TO agentworks_app;
GRANT USAGE ON SEQUENCE agentworks_events_notification_id_seq TO agentworks_app;
GRANT SELECT, INSERT ON agentworks_snapshots TO agentworks_app;
GRANT SELECT, INSERT ON command_log TO agentworks_app;
GRANT USAGE ON TYPE stored_event_uuid TO agentworks_app;
