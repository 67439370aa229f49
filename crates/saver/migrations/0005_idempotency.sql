-- The first answer to a Store call with an idempotency key, for 24 hours.
-- `response` is the protobuf StoreResponse.
CREATE TABLE IF NOT EXISTS idempotency (
    app VARCHAR(64) NOT NULL,
    idem_key VARCHAR(255) NOT NULL,
    response MEDIUMBLOB NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (app, idem_key)
);
