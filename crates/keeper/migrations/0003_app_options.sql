-- Secret rotation, per-app rate limits and the single-login policy.
ALTER TABLE apps ADD COLUMN previous_jwt_secret VARCHAR(255) NOT NULL DEFAULT '';
ALTER TABLE apps ADD COLUMN previous_secret_until_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE apps ADD COLUMN rate_per_sec INT NOT NULL DEFAULT 0;
ALTER TABLE apps ADD COLUMN rate_burst INT NOT NULL DEFAULT 0;
ALTER TABLE apps ADD COLUMN single_login INT NOT NULL DEFAULT 0;
