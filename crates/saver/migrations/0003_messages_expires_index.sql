-- Lets the purge task find expired rows without scanning the table.
CREATE INDEX messages_expires ON messages (expires_ms);
