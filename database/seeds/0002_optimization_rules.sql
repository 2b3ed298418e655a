-- The design's four rules, as structured conditions instead of executable SQL.
-- Idempotent: a rule that exists by name is left as it is, conditions included.
WITH new_rules AS (
    INSERT INTO optimization_rules (rule_name, window_seconds, action_type, action_parameters, priority, cooldown_seconds)
    VALUES
        ('Scale Up on High Queue', 60, 'scale_up', '{"max_replicas": 5, "scale_factor": 2}', 100, 120),
        ('Scale Down on Low Activity', 300, 'scale_down', '{"min_replicas": 1, "idle_threshold_seconds": 300}', 80, 300),
        ('Switch to Faster Model on Timeout', 600, 'switch_model', '{"prefer_speed_over_accuracy": true, "max_processing_time_ms": 20000}', 90, 600),
        ('Reduce Resources on Low Utilization', 3600, 'adjust_resources', '{"cpu_reduction": 0.5, "memory_reduction": 0.3}', 60, 3600)
    ON CONFLICT (rule_name) DO NOTHING
    RETURNING id, rule_name
)
INSERT INTO optimization_rule_conditions (rule_id, position, metric, aggregate, operator, threshold)
SELECT r.id, c.position, c.metric, c.aggregate, c.operator, c.threshold
FROM new_rules r
JOIN (VALUES
    ('Scale Up on High Queue', 0, 'pending_queue_length', 'current', '>', 10),
    ('Scale Down on Low Activity', 0, 'request_count', 'count', '<', 2),
    ('Switch to Faster Model on Timeout', 0, 'avg_processing_time_ms', 'avg', '>', 30000),
    ('Reduce Resources on Low Utilization', 0, 'avg_cpu_percent', 'avg', '<', 30),
    ('Reduce Resources on Low Utilization', 1, 'avg_memory_mb', 'avg', '<', 2048)
) AS c (rule_name, position, metric, aggregate, operator, threshold) ON c.rule_name = r.rule_name;
