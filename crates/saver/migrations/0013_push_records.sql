-- One row per group push or broadcast: what message_status answers for its id.
CREATE TABLE IF NOT EXISTS push_records (
    id BIGINT NOT NULL PRIMARY KEY,
    app VARCHAR(64) NOT NULL,
    kind VARCHAR(16) NOT NULL,
    target VARCHAR(255) NOT NULL,
    created_ms BIGINT NOT NULL,
    keep_until_ms BIGINT NOT NULL,
    members BIGINT NOT NULL DEFAULT 0,
    fanout_done INT NOT NULL DEFAULT 0,
    delivered BIGINT NOT NULL DEFAULT 0
);
