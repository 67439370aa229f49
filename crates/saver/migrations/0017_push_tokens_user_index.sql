-- A user's tokens: `app = ? AND user_id = ?`, and a device's: `... AND device = ?`.
CREATE INDEX push_tokens_user ON push_tokens (app, user_id, device);
