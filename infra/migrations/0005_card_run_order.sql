-- A card's last run is the run requested last in the log, whatever order the projector sees
-- run and card events in (they travel on different Kafka topics).
ALTER TABLE rm_cards ADD COLUMN last_run_position bigint NOT NULL DEFAULT 0;
