"""Recommendations from measured performance, each with its evidence (numbers and window)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import psycopg

from services.optimizer import queries


@dataclass(frozen=True)
class Thresholds:
    """When a figure is bad enough to recommend something, and how much data that needs."""

    min_samples: int = 20
    min_success_rate: float = 0.8
    min_validation_pass_rate: float = 0.8
    # cpu_usage_percent is a percent of one core, allocated_cpu is in cores.
    over_allocated_cpu_share: float = 0.25
    over_allocated_memory_share: float = 0.5
    resource_error_classes: tuple[str, ...] = ("oom", "oom_killed", "killed", "out_of_memory")
    min_buckets: int = 4
    load_latency_correlation: float = 0.7
    load_latency_growth: float = 1.5


def analyze(conn: psycopg.Connection, window_seconds: int,
            thresholds: Thresholds = Thresholds()) -> list[dict]:
    """Every recommendation the window's data supports."""
    since = queries.window_start(conn, window_seconds)
    stats = queries.model_window_stats(conn, since, list(thresholds.resource_error_classes))
    bucket = timedelta(seconds=max(window_seconds // 12, 60))
    load = {row["model_id"]: row for row in queries.load_latency(conn, since, bucket)}
    formats = queries.format_validation(conn, since)
    found = []
    for model in stats:
        for check in (_success, _over_allocated, _under_allocated, _unused):
            found.extend(check(model, load.get(model["model_id"]), thresholds))
    found.extend(_format_validation(formats, thresholds))
    return [{**item, "window_seconds": window_seconds} for item in found]


def _recommend(model: dict, kind: str, recommendation: str, detail: str, evidence: dict,
               output_format: str | None = None) -> dict:
    return {"kind": kind, "recommendation": recommendation, "model_id": model["model_id"],
            "model_name": f"{model['name']}:{model['version']}", "output_format": output_format,
            "detail": detail, "evidence": evidence}


def _success(model: dict, load: dict | None, t: Thresholds) -> list[dict]:
    rate, n = model["success_rate"], model["request_count"]
    if n < t.min_samples or rate >= t.min_success_rate:
        return []
    # Demoting is safe only when other models carry its task types; otherwise replace it.
    action = "demote" if model["has_alternative"] else "replace"
    return [_recommend(model, "low_success_rate", action,
                       f"{rate:.0%} of {n} attempts succeeded (threshold {t.min_success_rate:.0%})",
                       {"success_rate": rate, "request_count": n, "threshold": t.min_success_rate,
                        "has_alternative": model["has_alternative"]})]


def _over_allocated(model: dict, load: dict | None, t: Thresholds) -> list[dict]:
    found = []
    cpu, allocated_cpu = model["avg_cpu_percent"], model["allocated_cpu"]
    if allocated_cpu and model["cpu_samples"] >= t.min_samples:
        used_cores = cpu / 100
        if used_cores < t.over_allocated_cpu_share * allocated_cpu:
            found.append(_recommend(model, "over_allocated", "reduce_cpu",
                                    f"uses {used_cores:.2f} of {allocated_cpu:g} allocated cores on average",
                                    {"avg_cpu_percent": cpu, "allocated_cpu": allocated_cpu,
                                     "samples": model["cpu_samples"],
                                     "threshold_share": t.over_allocated_cpu_share}))
    peak, allocated_memory = model["max_memory_mb"], model["allocated_memory_mb"]
    if allocated_memory and model["memory_samples"] >= t.min_samples:
        if peak < t.over_allocated_memory_share * allocated_memory:
            found.append(_recommend(model, "over_allocated", "reduce_memory",
                                    f"peaks at {peak:.0f} MB of {allocated_memory:.0f} MB allocated",
                                    {"max_memory_mb": peak, "avg_memory_mb": model["avg_memory_mb"],
                                     "allocated_memory_mb": allocated_memory,
                                     "samples": model["memory_samples"],
                                     "threshold_share": t.over_allocated_memory_share}))
    return found


def _under_allocated(model: dict, load: dict | None, t: Thresholds) -> list[dict]:
    found = []
    if model["resource_errors"]:
        found.append(_recommend(model, "under_allocated", "increase_memory",
                                f"{model['resource_errors']} attempts were killed for resources",
                                {"resource_errors": model["resource_errors"],
                                 "request_count": model["request_count"],
                                 "error_classes": list(t.resource_error_classes),
                                 "allocated_memory_mb": model["allocated_memory_mb"]}))
    if load and load["buckets"] >= t.min_buckets and load["load_latency_correlation"] is not None:
        r, low, high = load["load_latency_correlation"], load["min_bucket_p95_ms"], load["max_bucket_p95_ms"]
        if r >= t.load_latency_correlation and high >= t.load_latency_growth * low:
            found.append(_recommend(model, "under_allocated", "increase_cpu",
                                    f"p95 rises with load (r={r:.2f}) from {low:.0f} to {high:.0f} ms",
                                    {"load_latency_correlation": r, "buckets": load["buckets"],
                                     "min_bucket_p95_ms": low, "max_bucket_p95_ms": high,
                                     "allocated_cpu": model["allocated_cpu"]}))
    return found


def _unused(model: dict, load: dict | None, t: Thresholds) -> list[dict]:
    if not model["active"] or model["request_count"] or model["assigned_requests"]:
        return []
    return [_recommend(model, "unused", "remove", "never chosen in the window",
                       {"request_count": 0, "assigned_requests": 0})]


def _format_validation(rows: list[dict], t: Thresholds) -> list[dict]:
    found = []
    for row in rows:
        if row["validated"] < t.min_samples or row["validation_pass_rate"] >= t.min_validation_pass_rate:
            continue
        better = [o for o in rows if o["output_format"] == row["output_format"]
                  and o["model_id"] != row["model_id"] and o["validated"] >= t.min_samples
                  and o["validation_pass_rate"] > row["validation_pass_rate"]]
        best = better[0] if better else None  # rows are ordered best pass rate first
        evidence = {"validation_pass_rate": row["validation_pass_rate"], "validated": row["validated"],
                    "threshold": t.min_validation_pass_rate,
                    "better_model_id": str(best["model_id"]) if best else None,
                    "better_model_pass_rate": best["validation_pass_rate"] if best else None}
        detail = (f"{row['validation_pass_rate']:.0%} of {row['validated']} {row['output_format']} outputs "
                  "passed validation" + (f"; {best['name']}:{best['version']} passes "
                                         f"{best['validation_pass_rate']:.0%}" if best else ""))
        found.append(_recommend(row, "low_validation_pass_rate", "prefer_other_model", detail, evidence,
                                row["output_format"]))
    return found
