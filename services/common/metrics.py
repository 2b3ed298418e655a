"""Prometheus request metrics and the `/metrics` exposition."""
from __future__ import annotations

import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest, multiprocess)
from prometheus_client import REGISTRY

REQUESTS = Counter(
    "dispatcher_http_requests_total", "HTTP requests served",
    ["service", "method", "endpoint", "status"],
)
LATENCY = Histogram(
    "dispatcher_http_request_duration_seconds", "HTTP request latency",
    ["service", "method", "endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def _endpoint_label() -> str:
    # The URL rule, not the path: /models/<id> is one series, not one per id.
    return request.url_rule.rule if request.url_rule else "unmatched"


def install_request_metrics(app: Flask, service: str) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _record(response: Response) -> Response:
        started = g.pop("request_started", None)
        if started is not None:
            endpoint = _endpoint_label()
            LATENCY.labels(service, request.method, endpoint).observe(time.perf_counter() - started)
            REQUESTS.labels(service, request.method, endpoint, str(response.status_code)).inc()
        return response


def metrics_response() -> Response:
    """The exposition text; aggregates the web server's worker processes when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
