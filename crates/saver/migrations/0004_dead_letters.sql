-- Messages delivered `max_attempts` times without an ACK, moved out of the inbox.
CREATE TABLE IF NOT EXISTS dead_letters (
    id BIGINT NOT NULL PRIMARY KEY,
    app VARCHAR(64) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    payload MEDIUMBLOB NOT NULL,
    created_ms BIGINT NOT NULL,
    attempts INT NOT NULL,
    dead_ms BIGINT NOT NULL
);
