"""The fixed list of rule metrics: each one is a fixed parameterised query, never SQL from a row."""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from services.optimizer import queries



@dataclass(frozen=True)
class Metric:
    """A metric's query; its columns are the aggregates a condition may ask for."""

    query: str
    aggregates: tuple[str, ...]
    description: str


METRICS: dict[str, Metric] = {
    "pending_queue_length": Metric(queries.PENDING_QUEUE_LENGTH, ("current",),
                                   "requests waiting in request_queue (now)"),
    "request_count": Metric(queries.REQUEST_COUNT, ("count",), "performance rows in the window"),
    "avg_processing_time_ms": Metric(queries.PROCESSING_TIME, ("avg", "min", "max"),
                                     "processing time over the window"),
    "p95_processing_time_ms": Metric(queries.PROCESSING_TIME_PERCENTILES, ("p95", "p99"),
                                     "processing time percentiles over the window"),
    "success_rate": Metric(queries.SUCCESS_RATE, ("avg",), "share of successful attempts"),
    "validation_pass_rate": Metric(queries.VALIDATION_PASS_RATE, ("avg",),
                                   "share of validated outputs that passed"),
    "avg_cpu_percent": Metric(queries.CPU_PERCENT, ("avg", "min", "max"), "measured CPU use"),
    "avg_memory_mb": Metric(queries.MEMORY_MB, ("avg", "min", "max"), "measured memory use"),
    "idle_seconds": Metric(queries.IDLE_SECONDS, ("current",), "seconds since the last activity of the "
                           "running runtimes, 0 while one serves a request (now)"),
    "running_runtimes": Metric(queries.RUNNING_RUNTIMES, ("current",), "running runtimes (now)"),
}

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "=": operator.eq, "!=": operator.ne,
}


def scope_filter(scope: str, scope_value: str | None) -> dict:
    """The model_id / task_type filters a rule scope stands for."""
    return {"model_id": scope_value if scope == "model" else None,
            "task_type": scope_value if scope == "task_type" else None}


def measure(conn: psycopg.Connection, metric: str, aggregate: str, *, window_seconds: int,
            scope: str, scope_value: str | None, model_id: str | None = None) -> float | None:
    """The value of one metric aggregate over a window and scope (narrowed to one model with
    `model_id`); None when there is no data."""
    filters = scope_filter(scope, scope_value)
    if model_id is not None:
        filters["model_id"] = model_id
    row = queries.metric_row(conn, METRICS[metric].query, window_seconds=window_seconds, **filters)
    value = row[aggregate]
    return None if value is None else float(value)


def compare(value: float | None, op: str, threshold: float) -> bool:
    """A condition holds only on a measured value: no data never triggers an action."""
    return value is not None and OPERATORS[op](value, threshold)
