-- Device push tokens (issue 25): one row per (app, provider, token). A token
-- belongs to one user and device at a time (a re-registration moves it); a
-- device keeps one token per provider. Tokens and ids compare byte for byte.
CREATE TABLE IF NOT EXISTS push_tokens (
    app VARCHAR(64) NOT NULL,
    provider VARCHAR(8) NOT NULL,
    token VARCHAR(512) COLLATE BINARY NOT NULL,
    user_id VARCHAR(255) COLLATE BINARY NOT NULL,
    device VARCHAR(255) COLLATE BINARY NOT NULL,
    platform VARCHAR(255) NOT NULL,
    bundle VARCHAR(255) NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (app, provider, token)
);
