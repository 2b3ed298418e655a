-- The requests holding a runtime: a runtime that restarts drops their holds in the same statement,
-- so that their late releases do not take requests of its next run off its busy count.
CREATE INDEX request_queue_holders_idx ON request_queue (assigned_runtime_id) WHERE holds_runtime;
