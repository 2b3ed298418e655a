-- The rules on single columns of the three tables every dispatch writes (request_queue,
-- performance_logs, container_lifecycle) move from CHECK constraints to domains. Same rules, same
-- check_violation; but Postgres reads every CHECK of a table back from its stored text and compiles
-- it on each statement that writes the table, and each dispatch writes these tables five times:
-- that was about a sixth of the database's CPU per dispatch. A domain's rule is read once per
-- connection, and checked only for the columns a statement sets. Rules across columns stay CHECKs.

CREATE DOMAIN task_type AS text
    CHECK (VALUE IN ('text-generation', 'code-generation', 'question-answering', 'conversation',
                     'summarization', 'classification'));
CREATE DOMAIN request_status AS text CHECK (VALUE IN ('pending', 'processing', 'completed', 'failed', 'cancelled'));
CREATE DOMAIN request_mode AS text CHECK (VALUE IN ('sync', 'async'));
CREATE DOMAIN request_priority AS integer CHECK (VALUE BETWEEN 0 AND 1000);    -- higher runs first
CREATE DOMAIN output_format AS text CHECK (VALUE IN ('json', 'markdown', 'code', 'text'));
CREATE DOMAIN runtime_driver AS text CHECK (VALUE IN ('process', 'docker', 'external'));
CREATE DOMAIN runtime_status AS text
    CHECK (VALUE IN ('starting', 'running', 'draining', 'stopping', 'stopped', 'error'));
CREATE DOMAIN health_status AS text CHECK (VALUE IN ('unknown', 'healthy', 'unhealthy'));
CREATE DOMAIN json_object AS jsonb CHECK (jsonb_typeof(VALUE) = 'object');
CREATE DOMAIN http_url AS text CHECK (VALUE ~ '^https?://');
CREATE DOMAIN tcp_port AS integer CHECK (VALUE BETWEEN 1 AND 65535);
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE DOMAIN non_negative_int AS integer CHECK (VALUE >= 0);
CREATE DOMAIN non_negative_bigint AS bigint CHECK (VALUE >= 0);
CREATE DOMAIN non_negative_float AS double precision CHECK (VALUE >= 0);
CREATE DOMAIN positive_share AS numeric(6,2) CHECK (VALUE > 0);      -- CPU cores
CREATE DOMAIN non_negative_share AS numeric(6,2) CHECK (VALUE >= 0); -- GPUs, CPU percent

ALTER TABLE request_queue
    DROP CONSTRAINT request_queue_request_payload_check,
    DROP CONSTRAINT request_queue_task_type_check,
    DROP CONSTRAINT request_queue_priority_check,
    DROP CONSTRAINT request_queue_mode_check,
    DROP CONSTRAINT request_queue_status_check,
    DROP CONSTRAINT request_queue_attempts_check,
    DROP CONSTRAINT request_queue_estimated_processing_time_check,
    DROP CONSTRAINT request_queue_callback_url_check,
    ALTER COLUMN request_payload TYPE json_object,
    ALTER COLUMN task_type TYPE task_type,
    ALTER COLUMN priority TYPE request_priority,
    ALTER COLUMN mode TYPE request_mode,
    ALTER COLUMN status TYPE request_status,
    ALTER COLUMN attempts TYPE non_negative_int,
    ALTER COLUMN estimated_processing_time TYPE non_negative_int,
    ALTER COLUMN callback_url TYPE http_url;

ALTER TABLE container_lifecycle
    DROP CONSTRAINT container_lifecycle_driver_check,
    DROP CONSTRAINT container_lifecycle_pid_check,
    DROP CONSTRAINT container_lifecycle_driver_state_check,
    DROP CONSTRAINT container_lifecycle_port_check,
    DROP CONSTRAINT container_lifecycle_status_check,
    DROP CONSTRAINT container_lifecycle_health_status_check,
    DROP CONSTRAINT container_lifecycle_allocated_cpu_check,
    DROP CONSTRAINT container_lifecycle_allocated_memory_check,
    DROP CONSTRAINT container_lifecycle_allocated_gpu_check,
    DROP CONSTRAINT container_lifecycle_active_requests_check,
    DROP CONSTRAINT container_lifecycle_total_requests_check,
    DROP CONSTRAINT container_lifecycle_restart_count_check,
    DROP CONSTRAINT container_lifecycle_load_time_ms_check,
    ALTER COLUMN driver TYPE runtime_driver,
    ALTER COLUMN pid TYPE positive_int,
    ALTER COLUMN driver_state TYPE json_object,
    ALTER COLUMN port TYPE tcp_port,
    ALTER COLUMN status TYPE runtime_status,
    ALTER COLUMN health_status TYPE health_status,
    ALTER COLUMN allocated_cpu TYPE positive_share,
    ALTER COLUMN allocated_memory TYPE positive_int,
    ALTER COLUMN allocated_gpu TYPE non_negative_share,
    ALTER COLUMN active_requests TYPE non_negative_int,
    ALTER COLUMN total_requests TYPE non_negative_bigint,
    ALTER COLUMN restart_count TYPE non_negative_int,
    ALTER COLUMN load_time_ms TYPE non_negative_int;

-- The summary view reads some of performance_logs' columns: it is made again, from its own
-- definition, once they have their new types.
DO $$
DECLARE
    summary text := pg_get_viewdef('model_performance_summary'::regclass);
BEGIN
    DROP MATERIALIZED VIEW model_performance_summary;
    ALTER TABLE performance_logs
        DROP CONSTRAINT performance_logs_task_type_check,
        DROP CONSTRAINT performance_logs_output_format_check,
        DROP CONSTRAINT performance_logs_attempt_check,
        DROP CONSTRAINT performance_logs_template_version_check,
        DROP CONSTRAINT performance_logs_input_tokens_check,
        DROP CONSTRAINT performance_logs_output_tokens_check,
        DROP CONSTRAINT performance_logs_tokens_per_second_check,
        DROP CONSTRAINT performance_logs_processing_time_ms_check,
        DROP CONSTRAINT performance_logs_load_time_ms_check,
        DROP CONSTRAINT performance_logs_queue_wait_ms_check,
        DROP CONSTRAINT performance_logs_memory_used_mb_check,
        DROP CONSTRAINT performance_logs_cpu_usage_percent_check,
        ALTER COLUMN task_type TYPE task_type,
        ALTER COLUMN output_format TYPE output_format,
        ALTER COLUMN attempt TYPE positive_int,
        ALTER COLUMN template_version TYPE positive_int,
        ALTER COLUMN input_tokens TYPE non_negative_int,
        ALTER COLUMN output_tokens TYPE non_negative_int,
        ALTER COLUMN tokens_per_second TYPE non_negative_float,
        ALTER COLUMN processing_time_ms TYPE non_negative_int,
        ALTER COLUMN load_time_ms TYPE non_negative_int,
        ALTER COLUMN queue_wait_ms TYPE non_negative_int,
        ALTER COLUMN memory_used_mb TYPE non_negative_int,
        ALTER COLUMN cpu_usage_percent TYPE non_negative_share;
    EXECUTE 'CREATE MATERIALIZED VIEW model_performance_summary AS ' || summary;
    -- REFRESH ... CONCURRENTLY needs a unique index without a WHERE clause.
    CREATE UNIQUE INDEX model_performance_summary_model_idx ON model_performance_summary (model_id);
END;
$$;
