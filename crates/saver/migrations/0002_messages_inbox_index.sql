-- A user's unacked inbox in id order: `app = ? AND user_id = ? AND acked_ms IS NULL ORDER BY id`.
-- `id` is listed explicitly because SQLite does not append the primary key to indexes.
CREATE INDEX messages_inbox ON messages (app, user_id, acked_ms, id);
