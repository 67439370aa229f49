-- Group membership per app (issue 12). Group and user compare byte for byte
-- (`COLLATE BINARY`: VARBINARY on MySQL/MariaDB, memcmp on SQLite), the same
-- order as the Redis hot copy, so a page cursor means the same in both.
CREATE TABLE IF NOT EXISTS group_members (
    app VARCHAR(64) NOT NULL,
    grp VARCHAR(128) COLLATE BINARY NOT NULL,
    user_id VARCHAR(255) COLLATE BINARY NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (app, grp, user_id)
);
