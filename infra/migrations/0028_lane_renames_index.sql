-- A project's lane renames, found without reading its other events (a busy board has one event
-- per move): `cardHistory` and `agentworks replay card` name a card's lane as the board named
-- it at the instant shown (projections.history.lane_then). Only rename rows are indexed.
CREATE INDEX IF NOT EXISTS agentworks_events_lane_renamed_idx
    ON agentworks_events (originator_id, originator_version)
    WHERE topic = 'domain.project:Project.LaneRenamed';
