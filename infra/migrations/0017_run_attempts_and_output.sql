-- Agent runs: every provider attempt (what AgentRun.attempts shows) and each run's final output.
-- Both are insert-only: an attempt or an output is recorded once and never changes.
CREATE TABLE rm_run_attempts (
    workspace_id uuid NOT NULL,
    run_id uuid NOT NULL,
    attempt integer NOT NULL,
    at timestamptz NOT NULL,
    provider text NOT NULL,
    model text NOT NULL,
    status text NOT NULL,
    http_status integer,
    error text,
    latency_ms integer NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    provider_cost_micros bigint NOT NULL,
    estimated boolean NOT NULL,
    PRIMARY KEY (run_id, attempt)
);

CREATE TABLE rm_run_outputs (
    workspace_id uuid NOT NULL,
    run_id uuid PRIMARY KEY,
    output text NOT NULL
);

SELECT agentworks_secure_read_model(t::regclass) FROM unnest(ARRAY[
    'rm_run_attempts', 'rm_run_outputs'
]) AS t;
