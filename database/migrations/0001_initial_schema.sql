-- The whole schema shared by the four services.
-- Enumerations are CHECK constraints on text so a new value is one ALTER, not a type migration.

CREATE FUNCTION set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

-- Models the dispatcher may route to, and how each is served.
CREATE TABLE model_registry (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                    text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    version                 text NOT NULL CHECK (version ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    -- A model serves one or more task types (a general chat model serves several).
    task_types              text[] NOT NULL CHECK (
        cardinality(task_types) BETWEEN 1 AND 6
        AND task_types <@ ARRAY['text-generation', 'code-generation', 'question-answering',
                                'conversation', 'summarization', 'classification']::text[]),
    complexity_score        integer NOT NULL CHECK (complexity_score BETWEEN 1 AND 10),
    base_cpu_requirement    numeric(6,2) NOT NULL DEFAULT 1 CHECK (base_cpu_requirement > 0),
    base_memory_requirement integer NOT NULL CHECK (base_memory_requirement > 0),   -- MB
    base_gpu_requirement    numeric(6,2) NOT NULL DEFAULT 0 CHECK (base_gpu_requirement >= 0),
    storage_requirement     integer CHECK (storage_requirement >= 0),               -- MB
    model_size              bigint CHECK (model_size >= 0),                         -- bytes
    download_url            text,
    runtime_driver          text NOT NULL DEFAULT 'docker'
                            CHECK (runtime_driver IN ('process', 'docker', 'external')),
    protocol                text NOT NULL DEFAULT 'ollama' CHECK (protocol IN ('ollama', 'openai')),
    -- What the driver needs: model file or package, image and model name, or endpoint.
    runtime_config          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(runtime_config) = 'object'),
    keep_alive_seconds      integer NOT NULL DEFAULT 300 CHECK (keep_alive_seconds >= -1),
    max_replicas            integer NOT NULL DEFAULT 1 CHECK (max_replicas BETWEEN 1 AND 64),
    -- Priors from the catalogue, overwritten by re-ranking from measured data.
    performance_metrics     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(performance_metrics) = 'object'),
    tags                    text[] NOT NULL DEFAULT '{}',
    active                  boolean NOT NULL DEFAULT true,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    UNIQUE (name, version)
);
CREATE INDEX model_registry_task_types_idx ON model_registry USING gin (task_types);
CREATE INDEX model_registry_tags_idx ON model_registry USING gin (tags);
CREATE INDEX model_registry_active_idx ON model_registry (id) WHERE active;
CREATE TRIGGER model_registry_updated_at BEFORE UPDATE ON model_registry
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- A new random version on every write to the catalogue, visible when the write commits: a
-- process keeps an in-memory copy of the catalogue for selection and checks it with one read.
CREATE TABLE model_registry_version (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version     uuid NOT NULL DEFAULT gen_random_uuid()
);
INSERT INTO model_registry_version DEFAULT VALUES;

CREATE FUNCTION bump_model_registry_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE model_registry_version SET version = gen_random_uuid();
    RETURN NULL;
END;
$$;
CREATE TRIGGER model_registry_version_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON model_registry FOR EACH STATEMENT EXECUTE FUNCTION bump_model_registry_version();

-- Runtimes of models (a process, a container or an external endpoint), whatever the driver.
CREATE TABLE container_lifecycle (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    model_id            uuid NOT NULL REFERENCES model_registry (id) ON DELETE CASCADE,
    driver              text NOT NULL CHECK (driver IN ('process', 'docker', 'external')),
    -- Driver identity: the container id, or the pid for a process; NULL until started.
    container_id        text UNIQUE,
    pid                 integer CHECK (pid > 0),
    driver_state        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(driver_state) = 'object'),
    host                text NOT NULL DEFAULT '127.0.0.1',
    port                integer CHECK (port BETWEEN 1 AND 65535),
    endpoint            text,
    status              text NOT NULL DEFAULT 'starting'
                        CHECK (status IN ('starting', 'running', 'draining', 'stopping', 'stopped', 'error')),
    health_status       text NOT NULL DEFAULT 'unknown' CHECK (health_status IN ('unknown', 'healthy', 'unhealthy')),
    allocated_cpu       numeric(6,2) NOT NULL CHECK (allocated_cpu > 0),
    allocated_memory    integer NOT NULL CHECK (allocated_memory > 0),              -- MB
    allocated_gpu       numeric(6,2) NOT NULL DEFAULT 0 CHECK (allocated_gpu >= 0),
    active_requests     integer NOT NULL DEFAULT 0 CHECK (active_requests >= 0),
    total_requests      bigint NOT NULL DEFAULT 0 CHECK (total_requests >= 0),
    restart_count       integer NOT NULL DEFAULT 0 CHECK (restart_count >= 0),
    load_time_ms        integer CHECK (load_time_ms >= 0),
    log_path            text,
    error_message       text,
    started_at          timestamptz,
    ready_at            timestamptz,
    stopped_at          timestamptz,
    last_activity       timestamptz NOT NULL DEFAULT now(),
    last_health_check   timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'stopped' OR stopped_at IS NOT NULL)
);
CREATE INDEX container_lifecycle_model_status_idx ON container_lifecycle (model_id, status);
CREATE INDEX container_lifecycle_live_idx ON container_lifecycle (status)
    WHERE status IN ('starting', 'running', 'draining', 'stopping');
CREATE TRIGGER container_lifecycle_updated_at BEFORE UPDATE ON container_lifecycle
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Prompt templates per task type and model family, versioned: a version is never rewritten.
CREATE TABLE prompt_templates (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- 'default' as task type is the global fallback.
    task_type       text NOT NULL CHECK (task_type IN ('default', 'text-generation', 'code-generation',
                        'question-answering', 'conversation', 'summarization', 'classification')),
    model_family    text NOT NULL DEFAULT 'default' CHECK (model_family ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    version         integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    system_template text NOT NULL DEFAULT '' CHECK (length(system_template) <= 20000),
    user_template   text NOT NULL CHECK (length(user_template) BETWEEN 1 AND 20000),
    description     text NOT NULL DEFAULT '',
    active          boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_type, model_family, version)
);
-- At most one active version per (task type, family): that is the one rendering uses.
CREATE UNIQUE INDEX prompt_templates_one_active_idx ON prompt_templates (task_type, model_family) WHERE active;

-- Every request the dispatcher accepted, sync or async; workers claim pending rows.
CREATE TABLE request_queue (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    request_payload         jsonb NOT NULL CHECK (jsonb_typeof(request_payload) = 'object'),
    task_type               text NOT NULL CHECK (task_type IN ('text-generation', 'code-generation',
                                'question-answering', 'conversation', 'summarization', 'classification')),
    -- Higher runs first.
    priority                integer NOT NULL DEFAULT 100 CHECK (priority BETWEEN 0 AND 1000),
    mode                    text NOT NULL DEFAULT 'sync' CHECK (mode IN ('sync', 'async')),
    status                  text NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')),
    attempts                integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    estimated_processing_time integer CHECK (estimated_processing_time >= 0),     -- ms
    assigned_model_id       uuid REFERENCES model_registry (id) ON DELETE SET NULL,
    assigned_runtime_id     uuid REFERENCES container_lifecycle (id) ON DELETE SET NULL,
    lease_owner             text,
    lease_expires_at        timestamptz,
    callback_url            text CHECK (callback_url ~ '^https?://'),
    result                  jsonb,
    error_details           jsonb,
    created_at              timestamptz NOT NULL DEFAULT now(),
    started_at              timestamptz,
    completed_at            timestamptz,
    CHECK (status <> 'processing' OR lease_expires_at IS NOT NULL),
    CHECK (status <> 'completed' OR result IS NOT NULL),
    CHECK (status NOT IN ('completed', 'failed', 'cancelled') OR completed_at IS NOT NULL)
);
CREATE INDEX request_queue_pending_idx ON request_queue (priority DESC, created_at) WHERE status = 'pending';
CREATE INDEX request_queue_lease_idx ON request_queue (lease_expires_at) WHERE status = 'processing';
CREATE INDEX request_queue_model_status_idx ON request_queue (assigned_model_id, status);
CREATE INDEX request_queue_created_idx ON request_queue (created_at);

-- One row per generation attempt (or per call an n8n flow reports).
CREATE TABLE performance_logs (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_id            uuid NOT NULL REFERENCES model_registry (id) ON DELETE CASCADE,
    runtime_id          uuid REFERENCES container_lifecycle (id) ON DELETE SET NULL,
    request_id          uuid,                   -- not a foreign key: n8n flows log their own requests
    task_type           text NOT NULL CHECK (task_type IN ('text-generation', 'code-generation',
                            'question-answering', 'conversation', 'summarization', 'classification')),
    output_format       text CHECK (output_format IN ('json', 'markdown', 'code', 'text')),
    attempt             integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    template_id         uuid REFERENCES prompt_templates (id) ON DELETE SET NULL,
    template_version    integer CHECK (template_version >= 1),
    input_tokens        integer CHECK (input_tokens >= 0),
    output_tokens       integer CHECK (output_tokens >= 0),
    tokens_per_second   double precision CHECK (tokens_per_second >= 0),
    processing_time_ms  integer NOT NULL CHECK (processing_time_ms >= 0),
    load_time_ms        integer CHECK (load_time_ms >= 0),
    queue_wait_ms       integer CHECK (queue_wait_ms >= 0),
    memory_used_mb      integer CHECK (memory_used_mb >= 0),
    cpu_usage_percent   numeric(6,2) CHECK (cpu_usage_percent >= 0),
    success             boolean NOT NULL,
    validation_passed   boolean,                -- NULL when the output was not validated
    error_class         text,
    error_message       text,
    logged_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (success OR error_class IS NOT NULL)
);
CREATE INDEX performance_logs_model_time_idx ON performance_logs (model_id, logged_at DESC);
CREATE INDEX performance_logs_time_idx ON performance_logs (logged_at);
CREATE INDEX performance_logs_request_idx ON performance_logs (request_id) WHERE request_id IS NOT NULL;

-- Quality ratings of answers, from a workflow or a person.
CREATE TABLE request_feedback (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id  uuid NOT NULL REFERENCES request_queue (id) ON DELETE CASCADE,
    model_id    uuid REFERENCES model_registry (id) ON DELETE CASCADE,
    score       numeric(4,3) NOT NULL CHECK (score BETWEEN 0 AND 1),
    label       text CHECK (length(label) <= 100),
    comment     text CHECK (length(comment) <= 5000),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX request_feedback_model_time_idx ON request_feedback (model_id, created_at DESC);
CREATE INDEX request_feedback_request_idx ON request_feedback (request_id);

-- Optimization rules: a structured condition evaluated by code with fixed queries (no stored SQL).
CREATE TABLE optimization_rules (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    rule_name           text NOT NULL UNIQUE CHECK (length(rule_name) BETWEEN 1 AND 200),
    window_seconds      integer NOT NULL DEFAULT 600 CHECK (window_seconds BETWEEN 1 AND 2592000),
    scope               text NOT NULL DEFAULT 'all' CHECK (scope IN ('all', 'task_type', 'model')),
    scope_value         text,
    action_type         text NOT NULL CHECK (action_type IN ('scale_up', 'scale_down', 'switch_model', 'adjust_resources')),
    action_parameters   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(action_parameters) = 'object'),
    priority            integer NOT NULL DEFAULT 100 CHECK (priority BETWEEN 0 AND 1000),
    cooldown_seconds    integer NOT NULL DEFAULT 300 CHECK (cooldown_seconds >= 0),
    active              boolean NOT NULL DEFAULT true,
    success_count       integer NOT NULL DEFAULT 0 CHECK (success_count >= 0),
    failure_count       integer NOT NULL DEFAULT 0 CHECK (failure_count >= 0),
    last_evaluated_at   timestamptz,
    last_triggered_at   timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((scope = 'all') = (scope_value IS NULL))
);
CREATE TRIGGER optimization_rules_updated_at BEFORE UPDATE ON optimization_rules
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- The conditions of a rule, all of which must hold (AND).
CREATE TABLE optimization_rule_conditions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id     uuid NOT NULL REFERENCES optimization_rules (id) ON DELETE CASCADE,
    position    integer NOT NULL CHECK (position >= 0),
    metric      text NOT NULL CHECK (metric IN ('pending_queue_length', 'request_count',
                    'avg_processing_time_ms', 'p95_processing_time_ms', 'success_rate',
                    'validation_pass_rate', 'avg_cpu_percent', 'avg_memory_mb', 'idle_seconds',
                    'running_runtimes')),
    aggregate   text NOT NULL DEFAULT 'avg' CHECK (aggregate IN ('avg', 'min', 'max', 'sum', 'count', 'p95', 'p99', 'current')),
    operator    text NOT NULL CHECK (operator IN ('>', '>=', '<', '<=', '=', '!=')),
    threshold   double precision NOT NULL,
    UNIQUE (rule_id, position)
);

-- Audit of every rule evaluation that acted (or would have, in a dry run).
CREATE TABLE optimization_actions (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id             uuid REFERENCES optimization_rules (id) ON DELETE SET NULL,
    rule_name           text NOT NULL,
    measured            jsonb NOT NULL DEFAULT '{}',
    action_type         text NOT NULL CHECK (action_type IN ('scale_up', 'scale_down', 'switch_model', 'adjust_resources')),
    action_parameters   jsonb NOT NULL DEFAULT '{}',
    dry_run             boolean NOT NULL DEFAULT false,
    status              text NOT NULL CHECK (status IN ('succeeded', 'failed', 'skipped')),
    result              jsonb,
    error               text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'failed' OR error IS NOT NULL)
);
CREATE INDEX optimization_actions_rule_time_idx ON optimization_actions (rule_id, created_at DESC);
CREATE INDEX optimization_actions_time_idx ON optimization_actions (created_at DESC);

-- Per-model figures over the last 24 hours. The window sits in the join, so a model
-- without recent logs keeps its row (with zero requests) instead of vanishing.
CREATE MATERIALIZED VIEW model_performance_summary AS
SELECT
    m.id                                                        AS model_id,
    m.name,
    m.version,
    m.task_types,
    m.active,
    count(pl.id)                                                AS total_requests,
    count(pl.id) FILTER (WHERE pl.success)                      AS successful_requests,
    avg(pl.success::int)::double precision                      AS success_rate,
    avg(pl.processing_time_ms)::double precision                AS avg_processing_time,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY pl.processing_time_ms)  AS p50_processing_time,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY pl.processing_time_ms) AS p95_processing_time,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY pl.processing_time_ms) AS p99_processing_time,
    avg(pl.tokens_per_second)                                   AS avg_tokens_per_second,
    avg(pl.load_time_ms)::double precision                      AS avg_load_time,
    avg(pl.memory_used_mb)::double precision                    AS avg_memory_usage,
    avg(pl.cpu_usage_percent)::double precision                 AS avg_cpu_usage,
    count(pl.validation_passed)                                 AS validated_requests,
    avg(pl.validation_passed::int)::double precision            AS validation_pass_rate,
    (SELECT avg(f.score) FROM request_feedback f
      WHERE f.model_id = m.id AND f.created_at > now() - interval '24 hours')::double precision
                                                                AS avg_feedback_score,
    max(pl.logged_at)                                           AS last_used,
    -- Not now(): two refreshes in one transaction must still differ (selection caches by it).
    statement_timestamp()                                       AS refreshed_at
FROM model_registry m
LEFT JOIN performance_logs pl
    ON pl.model_id = m.id
   AND pl.logged_at > now() - interval '24 hours'
GROUP BY m.id;

-- REFRESH ... CONCURRENTLY needs a unique index without a WHERE clause.
CREATE UNIQUE INDEX model_performance_summary_model_idx ON model_performance_summary (model_id);
