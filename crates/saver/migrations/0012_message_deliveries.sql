-- When each device of the message's user was handed a message, and when it
-- acknowledged it. Purged with the message's row (its TTL plus a day).
CREATE TABLE IF NOT EXISTS message_deliveries (
    id BIGINT NOT NULL,
    user_id VARCHAR(255) COLLATE BINARY NOT NULL,
    device VARCHAR(255) COLLATE BINARY NOT NULL,
    delivered_ms BIGINT NOT NULL,
    acked_ms BIGINT NULL,
    PRIMARY KEY (id, user_id, device)
);
