"""Scheduled work of the optimizer, as plain functions (run by services.optimizer.scheduler).

The optimizer's own work runs in-process; the orchestrator's (reaping idle runtimes, health
checks) goes through its HTTP endpoints, because the orchestrator owns the runtimes.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import timedelta

import requests

from services.common.config import Settings, env_int
from services.common.db import Database, connect
from services.optimizer import performance, rankings, rules
from services.optimizer.actions import ActionError, send

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobConfig:
    """Intervals in seconds, each from OPTIMIZER_<NAME>_INTERVAL_S; 0 disables a job."""

    refresh_summary: int = 300
    optimize: int = 60
    update_rankings: int = 900
    purge_performance: int = 3600
    reap_idle_runtimes: int = 60
    check_runtime_health: int = 30
    ranking_window_s: int = 86_400
    purge_batch_size: int = 5000

    def __post_init__(self) -> None:
        for f in fields(self):
            least = 1 if f.name in ("ranking_window_s", "purge_batch_size") else 0
            if getattr(self, f.name) < least:   # a purge batch of 0 would delete nothing, for ever
                raise ValueError(f"{self.env_name(f.name)} must be at least {least}, got {getattr(self, f.name)}")

    @staticmethod
    def env_name(field_name: str) -> str:
        suffix = "" if field_name.endswith(("_s", "_size")) else "_INTERVAL_S"
        return f"OPTIMIZER_{field_name.upper()}{suffix}"

    @classmethod
    def from_env(cls) -> JobConfig:
        return cls(**{f.name: env_int(cls.env_name(f.name), f.default) for f in fields(cls)})


@dataclass(frozen=True)
class ScheduledJob:
    id: str
    interval_s: int
    run: Callable[[], object]


def refresh_summary(settings: Settings) -> dict:
    return performance.refresh_summary(settings.database_url, settings.db_statement_timeout_ms)


def optimize(settings: Settings, db: Database, session: requests.Session) -> list[dict]:
    return rules.optimize(db, session, settings)


def update_rankings(db: Database, window_seconds: int) -> dict:
    with db.connection() as conn:
        return rankings.update_rankings(conn, window_seconds)


def purge_performance(settings: Settings, batch_size: int) -> int:
    # Autocommit: every batch commits by itself, so no long transaction holds the rows.
    with connect(settings.database_url, autocommit=True, statement_timeout_ms=settings.db_statement_timeout_ms) as conn:
        return performance.purge_old_performance(
            conn, timedelta(days=settings.performance_retention_days), batch_size)


def reap_idle_runtimes(settings: Settings, session: requests.Session) -> int:
    return send(session, "POST", f"{settings.orchestrator_url}/runtimes/reap", {})


def check_runtime_health(settings: Settings, session: requests.Session) -> int:
    return send(session, "POST", f"{settings.orchestrator_url}/runtimes/health", {})


def scheduled_jobs(settings: Settings, db: Database, session: requests.Session,
                   config: JobConfig) -> list[ScheduledJob]:
    """The job table: id, interval and what runs."""
    table = [
        ScheduledJob("refresh_summary", config.refresh_summary, lambda: refresh_summary(settings)),
        ScheduledJob("optimize", config.optimize, lambda: optimize(settings, db, session)),
        ScheduledJob("update_rankings", config.update_rankings,
                     lambda: update_rankings(db, config.ranking_window_s)),
        ScheduledJob("purge_performance", config.purge_performance,
                     lambda: purge_performance(settings, config.purge_batch_size)),
        ScheduledJob("reap_idle_runtimes", config.reap_idle_runtimes,
                     lambda: reap_idle_runtimes(settings, session)),
        ScheduledJob("check_runtime_health", config.check_runtime_health,
                     lambda: check_runtime_health(settings, session)),
    ]
    return [job for job in table if job.interval_s > 0]


def logged(job_id: str, run: Callable[[], object]) -> Callable[[], None]:
    """Run a job, logging its duration; an error is logged and never reaches the scheduler."""
    def run_logged() -> None:
        started = time.perf_counter()
        try:
            run()
        except ActionError as exc:
            # An owner service is down or refused: expected, so no traceback.
            logger.error("job failed", extra={"job": job_id, "duration_ms": _ms_since(started), "error": str(exc)})
        except Exception:
            logger.exception("job failed", extra={"job": job_id, "duration_ms": _ms_since(started)})
        else:
            logger.info("job done", extra={"job": job_id, "duration_ms": _ms_since(started)})
    return run_logged


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
