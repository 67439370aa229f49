-- The group push a message belongs to (NULL: a plain push).
ALTER TABLE messages ADD COLUMN parent_id BIGINT NULL;
