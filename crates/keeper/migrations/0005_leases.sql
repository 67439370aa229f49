-- Node leases and worker ids, kept here so any number of keepers can serve
-- one cluster and any of them can die. Times are the database server's
-- clock in Unix milliseconds. Valid in MySQL and SQLite.
CREATE TABLE IF NOT EXISTS leases (
    lease_id BIGINT NOT NULL PRIMARY KEY,
    node_id VARCHAR(255) NOT NULL,
    role INT NOT NULL,
    -- protobuf NodeInfo as registered (its load is `node_load`).
    node MEDIUMBLOB NOT NULL,
    node_load BIGINT NOT NULL,
    ttl_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX leases_node_id ON leases (node_id);
CREATE INDEX leases_expires ON leases (expires_ms);
-- One row per worker id ever handed out. `generation` grows by one with
-- every grant (the fencing token); a holder renews with its lease id and
-- generation, and an id is granted again only `margin` after `expires_ms`.
CREATE TABLE IF NOT EXISTS worker_ids (
    worker_id INT NOT NULL PRIMARY KEY,
    holder VARCHAR(255) NOT NULL,
    lease_id BIGINT NOT NULL,
    generation BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX worker_ids_lease ON worker_ids (lease_id);
