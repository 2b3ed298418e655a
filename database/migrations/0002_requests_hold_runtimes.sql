-- A request holds a runtime from the moment its attempt counts on it (active_requests + 1) until it
-- releases it. A worker that dies mid-attempt leaves the flag set: reclaiming the request then
-- gives the runtime its busy count back, so a dead worker never keeps a runtime busy forever.
ALTER TABLE request_queue ADD COLUMN holds_runtime boolean NOT NULL DEFAULT false;
