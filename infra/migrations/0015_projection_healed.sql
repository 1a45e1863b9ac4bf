-- How many events each projector applied from the store instead of from a delivery: gaps the
-- runner filled before a later event of the same aggregate, and what a sweep found missing. In a
-- healthy fan-out it stays at zero; a rising count means deliveries are being lost (or skipped
-- by a publisher), which the read models alone would hide since healing makes them right anyway.
ALTER TABLE projection_positions ADD COLUMN healed bigint NOT NULL DEFAULT 0;
