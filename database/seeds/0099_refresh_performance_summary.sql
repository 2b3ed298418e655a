-- The summary view is created empty of models (before any seed); fill it once the seeds are in.
REFRESH MATERIALIZED VIEW model_performance_summary;
