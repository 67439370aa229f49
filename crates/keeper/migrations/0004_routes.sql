-- Upstream routes: where coordinator sends a device's UPSTREAM frames of
-- (app, product, type); an empty type matches every type of the product.
CREATE TABLE IF NOT EXISTS routes (
    app VARCHAR(64) NOT NULL,
    product VARCHAR(128) NOT NULL,
    type VARCHAR(128) NOT NULL,
    url VARCHAR(1024) NOT NULL,
    timeout_ms INT NOT NULL,
    retries INT NOT NULL,
    concurrency INT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (app, product, type)
);
