-- How far the relay has published the event log to Kafka. It is advanced only after the broker
-- acknowledged everything up to that position, so a relay killed at any point resumes without
-- losing an event (it may publish some twice; projectors ignore duplicates).
CREATE TABLE relay_positions (
    relay text PRIMARY KEY,
    position bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
GRANT SELECT, INSERT, UPDATE ON relay_positions TO agentworks_app;
GRANT SELECT ON relay_positions TO agentworks_api, agentworks_projector;
