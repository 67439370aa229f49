-- Notification provider credentials per app (issue 25): one row per (app,
-- provider), the provider's fields as a JSON object (see NotifyProvider in
-- proto/cluster.proto). Valid in MySQL and SQLite.
CREATE TABLE IF NOT EXISTS notify_providers (
    app VARCHAR(64) NOT NULL,
    provider VARCHAR(16) NOT NULL,
    fields TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (app, provider)
);
