-- The summary counts the ratings its feedback score averages: selection weighs that score by how
-- many ratings it rests on, not by the requests served (a model rated without being used in the
-- window still has its score count).
DROP MATERIALIZED VIEW model_performance_summary;

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
    avg(pl.tokens_per_second)::double precision                 AS avg_tokens_per_second,
    avg(pl.load_time_ms)::double precision                      AS avg_load_time,
    avg(pl.memory_used_mb)::double precision                    AS avg_memory_usage,
    avg(pl.cpu_usage_percent)::double precision                 AS avg_cpu_usage,
    count(pl.validation_passed)                                 AS validated_requests,
    avg(pl.validation_passed::int)::double precision            AS validation_pass_rate,
    feedback.score                                              AS avg_feedback_score,
    feedback.ratings                                            AS feedback_count,
    max(pl.logged_at)                                           AS last_used,
    -- Not now(): two refreshes in one transaction must still differ (selection caches by it).
    statement_timestamp()                                       AS refreshed_at
FROM model_registry m
LEFT JOIN performance_logs pl
    ON pl.model_id = m.id
   AND pl.logged_at > now() - interval '24 hours'
CROSS JOIN LATERAL (
    SELECT avg(f.score)::double precision AS score, count(*) AS ratings
    FROM request_feedback f
    WHERE f.model_id = m.id AND f.created_at > now() - interval '24 hours'
) feedback
GROUP BY m.id, feedback.score, feedback.ratings;

-- REFRESH ... CONCURRENTLY needs a unique index without a WHERE clause.
CREATE UNIQUE INDEX model_performance_summary_model_idx ON model_performance_summary (model_id);
