-- Board time travel (`board(projectId, asOf)`) folds cards from their snapshots: the API role,
-- which already reads the event table, may read the snapshot table too. Nothing else changes.
GRANT SELECT ON agentworks_snapshots TO agentworks_api;
