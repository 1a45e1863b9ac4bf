-- A card's cost until an instant (cardHistory's state.cost, projections.queries.card_costs_until)
-- reads the ledger by card: without this index every cardHistory read the whole ledger of every
-- workspace (bench.scale: 229 ms of sequential scan over 352,002 entries for a card with none).
CREATE INDEX rm_ledger_entries_card_at_idx ON rm_ledger_entries (card_id, at);
