-- The sweep's watermark: every event a projector follows at or below it is applied. Deliveries
-- say nothing about events that never arrived; the sweep compares tracking with the log behind
-- this watermark and applies from the store what is missing (a lost tail of an aggregate).
ALTER TABLE projection_positions ADD COLUMN swept_through bigint NOT NULL DEFAULT 0;

-- What the broker acknowledged: the highest offset per topic-partition and each topic's id. A
-- later acknowledgement at or below such an offset, or a topic with another id, means the broker
-- lost part of its log (a restart without storage, an unclean leader election, a re-created
-- topic): the relay then republishes from the lowest sweep watermark of the projectors.
ALTER TABLE relay_positions ADD COLUMN broker_marks jsonb NOT NULL DEFAULT '{}';
GRANT SELECT ON projection_positions TO agentworks_app;
