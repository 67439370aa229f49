-- One row per (message, user). Ids are 63-bit snowflakes stored as BIGINT.
-- Valid on MySQL/MariaDB and SQLite (MEDIUMBLOB gets BLOB affinity there).
CREATE TABLE IF NOT EXISTS messages (
    id BIGINT NOT NULL PRIMARY KEY,
    app VARCHAR(64) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    payload MEDIUMBLOB NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    acked_ms BIGINT NULL,
    attempts INT NOT NULL DEFAULT 0
);
