-- Read-model versions per workspace, so a cached GraphQL answer (read_api.response_cache) is
-- invalidated by commits that change its workspace's rows and by no others: one busy tenant no
-- longer empties every tenant's cache.
--
-- rm_workspace_versions: one counter per (workspace, projector), bumped in the transaction of
-- every projector batch that applied an event of that workspace. Per projector, so the projectors
-- of one workspace never queue on one row (each already serialises on its own
-- projection_positions row). Under row-level security like every read model: the API reads its
-- workspace's counters only.
CREATE TABLE rm_workspace_versions (
    workspace_id uuid NOT NULL,
    projector text NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (workspace_id, projector)
);
SELECT agentworks_secure_read_model('rm_workspace_versions'::regclass);

-- read_model_epoch: one counter for what has no single workspace, bumped by a rebuild's swap
-- (every workspace's rows replaced at once) and by a batch that applied an event without a
-- workspace. Every cached answer's key includes it.
CREATE TABLE read_model_epoch (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch bigint NOT NULL
);
INSERT INTO read_model_epoch (singleton, epoch) VALUES (true, 0);
GRANT SELECT, UPDATE ON read_model_epoch TO agentworks_projector;
GRANT SELECT ON read_model_epoch TO agentworks_api;
