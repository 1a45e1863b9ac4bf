-- Dead letters of the projections. A projector that cannot apply an event parks that aggregate:
-- the event (and every later one of the same aggregate) waits here while the projector goes on
-- with every other aggregate, until an operator retries (`agentworks parked retry`) after a fix.
-- One row per parked aggregate and projector: the event it stopped at, and the latest error.
CREATE TABLE projection_parked (
    projector text NOT NULL,
    originator_id uuid NOT NULL,
    originator_version bigint NOT NULL,
    position bigint NOT NULL,
    event_type text NOT NULL,
    workspace_id uuid,
    error text NOT NULL,
    attempts integer NOT NULL DEFAULT 1,
    parked_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    failed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (projector, originator_id)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON projection_parked TO agentworks_projector;
GRANT SELECT ON projection_parked TO agentworks_api;
