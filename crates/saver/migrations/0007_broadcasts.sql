-- The entries of each topic's stream, trimmed by length and age on publish.
CREATE TABLE IF NOT EXISTS broadcasts (
    app VARCHAR(64) NOT NULL,
    topic VARCHAR(255) NOT NULL,
    seq BIGINT NOT NULL,
    id BIGINT NOT NULL,
    payload MEDIUMBLOB NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (app, topic, seq)
);
