-- `me.workspaces` (API.md "Identity"): the one read that crosses tenants. Row-level security
-- confines an API session to one workspace, so the workspaces a user belongs to come from this
-- narrow function instead: it runs as the read models' owner and answers only membership rows
-- (workspace id, name, role) of the user id it is given, which the API takes from the verified
-- token. Tables are looked up at each call, so a rebuild's table swap does not break it.
CREATE FUNCTION agentworks_user_workspaces(p_user text)
RETURNS TABLE (workspace_id uuid, name text, role text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS
$$
    SELECT m.workspace_id, w.name, m.role
      FROM rm_members m JOIN rm_workspaces w ON w.workspace_id = m.workspace_id
     WHERE m.user_id = p_user
     ORDER BY w.name, m.workspace_id
$$;
ALTER FUNCTION agentworks_user_workspaces(text) OWNER TO agentworks_projector;
REVOKE ALL ON FUNCTION agentworks_user_workspaces(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION agentworks_user_workspaces(text) TO agentworks_api;
