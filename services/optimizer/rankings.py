"""Re-ranking: measured figures of the recent window, smoothed toward priors, into the registry.

Smoothing (a Bayesian average): value = (n * measured + K * prior) / (n + K), with n the samples
the figure was measured on and K = PRIOR_WEIGHT pseudo-samples. A model with 2 samples stays close
to its prior; with 200 it is almost its measurement. The priors are the catalogue figures, copied
once into performance_metrics.priors on the first update, so repeated updates over the same window
give the same values instead of drifting. A figure the catalogue gives no prior for is smoothed
toward the prior selection would use for it (`prior_for`), so that being used moves a model's
figures only by what was measured; one without any (tokens/s, say) is the measurement as it is.

accuracy = smoothed(success_rate * validation_pass_rate * feedback_score), each factor measured in
the window and left out when it has no samples, smoothed toward the prior accuracy with n = the
sample size.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone

import psycopg

from services.optimizer import queries
from services.registry.selection import DEFAULT_ACCURACY, DEFAULT_P95_MS, DEFAULT_SUCCESS_RATE, P95_PER_MEAN

PRIOR_WEIGHT = 10
PRIOR_KEYS = ("avg_latency_ms", "p50_latency_ms", "p95_latency_ms", "tokens_per_second",
              "load_time_ms", "success_rate", "validation_pass_rate", "feedback_score", "accuracy")


def smooth(measured: float | None, samples: int, prior: float | None,
           weight: int = PRIOR_WEIGHT) -> float | None:
    """The measurement pulled toward the prior, the more so the fewer samples it rests on."""
    if measured is None or samples == 0:
        return prior
    if prior is None:
        return measured
    return (samples * measured + weight * prior) / (samples + weight)


def prior_for(key: str, priors: dict) -> float | None:
    """The catalogue's prior for a figure or, without one, the one selection falls back to."""
    if priors.get(key) is not None:
        return priors[key]
    if key in ("validation_pass_rate", "feedback_score"):
        return prior_for("accuracy", priors)
    if key == "p95_latency_ms":
        average = priors.get("avg_latency_ms")
        return DEFAULT_P95_MS if average is None else average * P95_PER_MEAN
    if key == "p50_latency_ms":
        return priors.get("avg_latency_ms")
    return {"success_rate": DEFAULT_SUCCESS_RATE, "accuracy": DEFAULT_ACCURACY}.get(key)


def update_rankings(conn: psycopg.Connection, window_seconds: int) -> dict:
    """Recompute every model's ranking inputs from the window and merge them into the registry."""
    since = queries.window_start(conn, window_seconds)
    updated, unchanged = [], 0
    for row in queries.ranking_inputs(conn, since):
        if not row["sample_size"] and not row["feedback_samples"]:
            unchanged += 1
            continue
        metrics = ranked_metrics(row, window_seconds)
        merged = queries.merge_performance_metrics(conn, row["model_id"], metrics)
        updated.append({"model_id": row["model_id"], "name": row["name"], "version": row["version"],
                        "sample_size": row["sample_size"], "performance_metrics": merged})
    return {"window_seconds": window_seconds, "updated": updated, "unchanged": unchanged}


def ranked_metrics(row: dict, window_seconds: int) -> dict:
    """The performance_metrics keys re-ranking writes for one model's measured row."""
    current = row["performance_metrics"]
    # Kept by the first re-ranking, even when empty: the figures beside them are its own output since.
    priors = current["priors"] if isinstance(current.get("priors"), dict) else {
        key: current[key] for key in PRIOR_KEYS
        if isinstance(current.get(key), (int, float)) and not isinstance(current.get(key), bool)}

    def prior(key: str) -> float | None:
        return prior_for(key, priors)

    n, ok = row["sample_size"], row["successes"]
    quality_factors = [value for value, samples in (
        (row["success_rate"], n), (row["validation_pass_rate"], row["validated"]),
        (row["feedback_score"], row["feedback_samples"])) if samples]
    quality = math.prod(quality_factors) if quality_factors else None
    figures = {
        "avg_latency_ms": smooth(row["avg_latency_ms"], ok, prior("avg_latency_ms")),
        "p50_latency_ms": smooth(row["p50_latency_ms"], ok, prior("p50_latency_ms")),
        "p95_latency_ms": smooth(row["p95_latency_ms"], ok, prior("p95_latency_ms")),
        "tokens_per_second": smooth(row["tokens_per_second"], row["tps_samples"], prior("tokens_per_second")),
        "load_time_ms": smooth(row["load_time_ms"], row["load_samples"], prior("load_time_ms")),
        "success_rate": smooth(row["success_rate"], n, prior("success_rate")),
        "validation_pass_rate": smooth(row["validation_pass_rate"], row["validated"],
                                       prior("validation_pass_rate")),
        "feedback_score": smooth(row["feedback_score"], row["feedback_samples"], prior("feedback_score")),
        "accuracy": smooth(quality, n or row["feedback_samples"], prior("accuracy")),
    }
    metrics = {key: round(value, 4) for key, value in figures.items() if value is not None}
    return {**metrics, "sample_size": n, "window_seconds": window_seconds,
            "updated_at": datetime.now(timezone.utc).isoformat(), "priors": priors}
