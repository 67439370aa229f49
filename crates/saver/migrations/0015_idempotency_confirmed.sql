-- How many retries with the same idempotency key were answered with the
-- first call's messages. A failed call's messages are withdrawn with its key
-- only while this is 0: once a retry answered them they stay. Valid in MySQL
-- and SQLite.
ALTER TABLE idempotency ADD COLUMN confirmed INT NOT NULL DEFAULT 0;
