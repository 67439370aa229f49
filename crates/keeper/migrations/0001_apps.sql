-- Apps: one tenant each, with the secret its device tokens are signed with and
-- the API key its backend calls the push API with. Valid in MySQL and SQLite.
CREATE TABLE IF NOT EXISTS apps (
    id VARCHAR(64) NOT NULL PRIMARY KEY,
    jwt_secret VARCHAR(255) NOT NULL,
    api_key VARCHAR(255) NOT NULL,
    webhook_url VARCHAR(1024) NOT NULL,
    updated_ms BIGINT NOT NULL
);
