-- The sweep's watermark: every event a projector follows at or below it is applied. Deliveries
-- say nothing about events that never arrived; the sweep compares tracking with the log behind
-- this watermark and applies from the store what is missing (a lost tail of an aggregate).
ALTER TABLE projection_positions ADD COLUMN swept_through bigint NOT NULL DEFAULT 0;
