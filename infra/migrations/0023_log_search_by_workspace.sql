-- Log search (projections.queries.search_logs) read every workspace's matches: the text index had
-- no workspace in it, so a 200-card workspace's search scanned a neighbour's 13.8M lines
-- (bench.scale: 1.6 s), and every match was ranked (2.1 s for a common word in a big workspace).
--
-- The workspace goes into the text index (btree_gin: trusted, so the database owner may create
-- it), so a rare word costs its own workspace's matches only; and a time-ordered index lets a
-- common word stop after the newest matches the search ranks (search_logs' candidate window)
-- instead of reading them all. The planner picks between the two by the word's frequency.
CREATE EXTENSION IF NOT EXISTS btree_gin;

-- The tsv-only index is found by its definition: a rebuild recreates indexes under the names of
-- its scratch tables, so the name 0002 gave it may be gone.
DO $$
DECLARE
    old regclass;
BEGIN
    FOR old IN
        SELECT i.indexrelid::regclass FROM pg_index AS i
        WHERE i.indrelid = 'rm_log_lines'::regclass
          AND pg_get_indexdef(i.indexrelid) LIKE '%USING gin (tsv)'
    LOOP
        EXECUTE format('DROP INDEX %s', old);
    END LOOP;
END
$$;

CREATE INDEX rm_log_lines_search_idx ON rm_log_lines USING gin (workspace_id, tsv);
CREATE INDEX rm_log_lines_recent_idx ON rm_log_lines (workspace_id, at, run_id, seq);
