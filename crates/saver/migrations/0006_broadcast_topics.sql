-- The SQL-only store's broadcast streams: one row per topic with its epoch and
-- latest offset (`last_seq`; `offset` is reserved in some SQL dialects).
CREATE TABLE IF NOT EXISTS broadcast_topics (
    app VARCHAR(64) NOT NULL,
    topic VARCHAR(255) NOT NULL,
    epoch BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    PRIMARY KEY (app, topic)
);
