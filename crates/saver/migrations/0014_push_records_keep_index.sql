-- Lets the purge find records past their keep time.
CREATE INDEX push_records_keep ON push_records (keep_until_ms);
