-- Which revision of its projector built each read model (`projections/revisions.py`): a change
-- to a fold or to its tables that leaves rows built by older code wrong or missing bumps the
-- projector's revision, and `agentworks migrate` (and `dev` at start) rebuilds every read model
-- recorded at a lower one.
--
-- Read models built before this migration are revision 1 by definition. The kanban projector
-- is at revision 2 since migration 0025 gave it tables (`rm_api_keys`, `rm_invitations`) filled
-- from events older than them, so a deployment that upgrades past this migration gets its kanban
-- read model rebuilt once; the rebuild's own tracking rows (`name#rebuild`) are no read model.
CREATE TABLE projection_revisions (
    projector text PRIMARY KEY,
    revision integer NOT NULL CHECK (revision >= 1),
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO projection_revisions (projector, revision)
    SELECT projector, 1 FROM projection_positions WHERE position > 0 AND projector NOT LIKE '%#%';
REVOKE ALL ON projection_revisions FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON projection_revisions TO agentworks_projector;
