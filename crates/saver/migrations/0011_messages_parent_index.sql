-- The member messages of a group push, for its status counts.
CREATE INDEX messages_parent ON messages (parent_id, id);
