-- Read models: disposable tables fed by projectors, rebuildable from the event log at any time.
-- Every table carries workspace_id; row-level security keyed to the per-transaction setting
-- `agentworks.workspace_id` confines any session of the API role to one workspace.
-- Positions are compared byte-wise (COLLATE "C"), exactly as the domain orders them.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentworks_api') THEN
        CREATE ROLE agentworks_api NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentworks_projector') THEN
        CREATE ROLE agentworks_projector NOLOGIN;
    END IF;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT agentworks_api, agentworks_projector TO %I', current_user);
EXCEPTION WHEN others THEN
    RAISE NOTICE 'could not grant read-side roles to %: %', current_user, SQLERRM;
END
$$;

GRANT USAGE, CREATE ON SCHEMA public TO agentworks_projector;

-- Projectors read the event log to heal gaps; the API reads it for card history and audit.
GRANT SELECT ON agentworks_events TO agentworks_projector, agentworks_api;

-- Applies the tenancy policy and privileges to a read-model table; rebuild calls it on the
-- fresh tables it builds before swapping them in.
CREATE FUNCTION agentworks_secure_read_model(tbl regclass) RETURNS void
    LANGUAGE plpgsql AS
$$
BEGIN
    -- The projector role owns read models so that it can rebuild and swap them on its own.
    EXECUTE format('ALTER TABLE %s OWNER TO agentworks_projector', tbl);
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);
    EXECUTE format(
        'CREATE POLICY tenant_isolation ON %s FOR SELECT TO agentworks_api USING ('
        'workspace_id = nullif(current_setting(''agentworks.workspace_id'', true), '''')::uuid)',
        tbl);
    EXECUTE format(
        'CREATE POLICY projector_all ON %s FOR ALL TO agentworks_projector '
        'USING (true) WITH CHECK (true)', tbl);
    EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', tbl);
    EXECUTE format('GRANT SELECT ON %s TO agentworks_api', tbl);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO agentworks_projector', tbl);
END
$$;

-- Projection bookkeeping: the last version applied per aggregate (exactly-once effect and gap
-- detection) and the highest position applied (lag, read-your-writes).
CREATE TABLE projection_versions (
    projector text NOT NULL,
    originator_id uuid NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (projector, originator_id)
);
CREATE TABLE projection_positions (
    projector text PRIMARY KEY,
    position bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
GRANT SELECT, INSERT, UPDATE, DELETE ON projection_versions, projection_positions
    TO agentworks_projector;
GRANT SELECT ON projection_versions, projection_positions TO agentworks_api;

-- Kanban -------------------------------------------------------------------------------------

CREATE TABLE rm_workspaces (
    workspace_id uuid PRIMARY KEY,
    name text NOT NULL,
    markup text NOT NULL,
    billing_increment_micros bigint NOT NULL,
    monthly_limit_micros bigint,
    stripe_customer_id text,
    version bigint NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE rm_members (
    workspace_id uuid NOT NULL,
    user_id text NOT NULL,
    role text NOT NULL,
    PRIMARY KEY (workspace_id, user_id)
);

CREATE TABLE rm_projects (
    workspace_id uuid NOT NULL,
    project_id uuid PRIMARY KEY,
    name text NOT NULL,
    archived boolean NOT NULL DEFAULT false,
    version bigint NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX rm_projects_workspace_idx ON rm_projects (workspace_id, created_at);

CREATE TABLE rm_lanes (
    workspace_id uuid NOT NULL,
    project_id uuid NOT NULL,
    name text NOT NULL,
    ord integer NOT NULL,
    wip_limit integer,
    card_count integer NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, name)
);

CREATE TABLE rm_cards (
    workspace_id uuid NOT NULL,
    card_id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    title text NOT NULL,
    description text NOT NULL,
    lane text NOT NULL,
    position text COLLATE "C" NOT NULL,
    assignee text,
    labels text[] NOT NULL DEFAULT '{}',
    blocked_reason text,
    archived boolean NOT NULL DEFAULT false,
    version bigint NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    last_run_id uuid,
    cost_micros bigint NOT NULL DEFAULT 0
);
CREATE INDEX rm_cards_board_idx ON rm_cards (project_id, lane, position) WHERE NOT archived;

-- Agent runs and their logs ------------------------------------------------------------------

CREATE TABLE rm_runs (
    workspace_id uuid NOT NULL,
    run_id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    card_id uuid NOT NULL,
    agent text NOT NULL,
    status text NOT NULL,
    provider text,
    model text,
    max_cost_micros bigint,
    input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens bigint NOT NULL DEFAULT 0,
    provider_cost_micros bigint NOT NULL DEFAULT 0,
    billed_micros bigint NOT NULL DEFAULT 0,
    llm_calls integer NOT NULL DEFAULT 0,
    requested_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    error text,
    log_line_count integer NOT NULL DEFAULT 0,
    version bigint NOT NULL
);
CREATE INDEX rm_runs_card_idx ON rm_runs (card_id, requested_at DESC);

CREATE TABLE rm_log_lines (
    workspace_id uuid NOT NULL,
    run_id uuid NOT NULL,
    seq integer NOT NULL,
    at timestamptz NOT NULL,
    stream text NOT NULL,
    text text NOT NULL,
    tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', text)) STORED,
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX rm_log_lines_search_idx ON rm_log_lines USING gin (tsv);

-- Billing ledger -----------------------------------------------------------------------------

CREATE TABLE rm_charges (
    workspace_id uuid NOT NULL,
    charge_id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    card_id uuid NOT NULL,
    run_id uuid NOT NULL,
    call_id text NOT NULL,
    provider text NOT NULL,
    model text NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    provider_cost_micros bigint NOT NULL,
    markup text NOT NULL,
    billed_micros bigint NOT NULL,
    credited_micros bigint NOT NULL DEFAULT 0,
    price_table_version text NOT NULL,
    month text NOT NULL,
    occurred_at timestamptz NOT NULL
);
CREATE INDEX rm_charges_month_idx ON rm_charges (workspace_id, month);

-- One row per charge event and correction: the ledger that statements and rollups sum.
CREATE TABLE rm_ledger_entries (
    workspace_id uuid NOT NULL,
    entry_position bigint PRIMARY KEY,
    charge_id uuid NOT NULL,
    kind text NOT NULL,
    project_id uuid NOT NULL,
    card_id uuid NOT NULL,
    run_id uuid NOT NULL,
    provider text NOT NULL,
    model text NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    provider_cost_micros bigint NOT NULL,
    billed_micros bigint NOT NULL,
    month text NOT NULL,
    day date NOT NULL,
    at timestamptz NOT NULL
);
CREATE INDEX rm_ledger_entries_ws_idx ON rm_ledger_entries (workspace_id, day);

CREATE TABLE rm_usage_daily (
    workspace_id uuid NOT NULL,
    day date NOT NULL,
    dimension text NOT NULL,
    key text NOT NULL,
    calls bigint NOT NULL DEFAULT 0,
    input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens bigint NOT NULL DEFAULT 0,
    provider_cost_micros bigint NOT NULL DEFAULT 0,
    billed_micros bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, day, dimension, key)
);

CREATE TABLE rm_statement_lines (
    workspace_id uuid NOT NULL,
    month text NOT NULL,
    project_id uuid NOT NULL,
    billed_exact_micros bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, month, project_id)
);

CREATE TABLE rm_monthly_spend (
    workspace_id uuid NOT NULL,
    month text NOT NULL,
    billed_micros bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, month)
);

-- Activity feed ------------------------------------------------------------------------------

CREATE TABLE rm_activity (
    workspace_id uuid NOT NULL,
    position bigint PRIMARY KEY,
    at timestamptz NOT NULL,
    actor text NOT NULL,
    kind text NOT NULL,
    summary text NOT NULL,
    card_id uuid,
    project_id uuid
);
CREATE INDEX rm_activity_feed_idx ON rm_activity (workspace_id, position DESC);

SELECT agentworks_secure_read_model(t::regclass) FROM unnest(ARRAY[
    'rm_workspaces', 'rm_members', 'rm_projects', 'rm_lanes', 'rm_cards', 'rm_runs',
    'rm_log_lines', 'rm_charges', 'rm_ledger_entries', 'rm_usage_daily', 'rm_statement_lines',
    'rm_monthly_spend', 'rm_activity'
]) AS t;
