-- A user's groups: `app = ? AND user_id = ? ORDER BY grp`.
CREATE INDEX group_members_user ON group_members (app, user_id, grp);
