-- Run-status events find their card by its last run.
CREATE INDEX rm_cards_last_run_idx ON rm_cards (last_run_id);
