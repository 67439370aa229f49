-- Cluster-wide settings as name -> value (for example dispatcher.balancer),
-- pushed to every node with the membership. Valid in MySQL and SQLite.
CREATE TABLE IF NOT EXISTS settings (
    name VARCHAR(128) NOT NULL PRIMARY KEY,
    value TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
