-- Headers the orchestrator sends with a request's callback (say, the token an n8n Wait node's
-- resume webhook requires). They are secrets: kept apart from request_payload, never returned by
-- any endpoint, and cleared once the request has ended and its callback has been made.
ALTER TABLE request_queue ADD COLUMN callback_headers jsonb
    CHECK (callback_headers IS NULL
           OR (callback_url IS NOT NULL AND jsonb_typeof(callback_headers) = 'object'));
