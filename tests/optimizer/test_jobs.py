from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from psycopg import errors as pg_errors
from responses import matchers

from services.common.config import Settings
from services.common.db import SingleConnectionDatabase, connect
from services.common.http import http_session
from services.optimizer import jobs
from services.optimizer.jobs import JobConfig, logged, scheduled_jobs
from services.optimizer.scheduler import build_scheduler

from .conftest import ORCHESTRATOR

SETTINGS = Settings(orchestrator_url=ORCHESTRATOR, api_token="tok")


@pytest.fixture
def session():
    return http_session(token=SETTINGS.api_token)


def test_job_table_ids_intervals_and_single_instances(db, session):
    scheduler = build_scheduler(scheduled_jobs(SETTINGS, db, session, JobConfig()))
    table = {job.id: (job.trigger.interval, job.max_instances, job.coalesce) for job in scheduler.get_jobs()}
    assert table == {
        "refresh_summary": (timedelta(seconds=300), 1, True),
        "optimize": (timedelta(seconds=60), 1, True),
        "update_rankings": (timedelta(seconds=900), 1, True),
        "purge_performance": (timedelta(seconds=3600), 1, True),
        "reap_idle_runtimes": (timedelta(seconds=60), 1, True),
        "check_runtime_health": (timedelta(seconds=30), 1, True),
    }


@pytest.mark.parametrize("name, value", [("OPTIMIZER_PURGE_BATCH_SIZE", "0"),
                                         ("OPTIMIZER_OPTIMIZE_INTERVAL_S", "-1")])
def test_a_setting_that_would_break_a_job_is_refused_at_start(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be at least"):
        JobConfig.from_env()


def test_intervals_come_from_the_environment(monkeypatch, db, session):
    monkeypatch.setenv("OPTIMIZER_OPTIMIZE_INTERVAL_S", "15")
    monkeypatch.setenv("OPTIMIZER_CHECK_RUNTIME_HEALTH_INTERVAL_S", "0")
    monkeypatch.setenv("OPTIMIZER_RANKING_WINDOW_S", "7200")
    config = JobConfig.from_env()
    assert (config.optimize, config.check_runtime_health, config.ranking_window_s) == (15, 0, 7200)
    ids = [job.id for job in scheduled_jobs(SETTINGS, db, session, config)]
    assert "check_runtime_health" not in ids and len(ids) == 5
    monkeypatch.setenv("OPTIMIZER_OPTIMIZE_INTERVAL_S", "soon")
    with pytest.raises(ValueError, match="OPTIMIZER_OPTIMIZE_INTERVAL_S must be an integer, got 'soon'"):
        JobConfig.from_env()


def test_a_failing_job_is_logged_with_its_duration_and_does_not_raise(caplog):
    def explode():
        raise RuntimeError("boom")

    with caplog.at_level(logging.INFO, logger="services.optimizer.jobs"):
        logged("optimize", explode)()
        logged("reap_idle_runtimes", lambda: jobs.reap_idle_runtimes(
            Settings(orchestrator_url="http://127.0.0.1:9"), http_session(retries=0)))()
        logged("refresh_summary", lambda: None)()
    failed, unreachable, done = caplog.records
    assert (failed.getMessage(), failed.job, failed.levelname, failed.exc_info[0]) == (
        "job failed", "optimize", "ERROR", RuntimeError)
    assert (unreachable.getMessage(), unreachable.job, unreachable.exc_info) == (
        "job failed", "reap_idle_runtimes", None)
    assert unreachable.error.startswith("POST http://127.0.0.1:9/runtimes/reap failed: ConnectionError")
    assert (done.getMessage(), done.job, done.levelname) == ("job done", "refresh_summary", "INFO")
    assert all(isinstance(r.duration_ms, float) for r in caplog.records)


def test_orchestrator_jobs_call_its_endpoints_with_the_token(session):
    import responses
    with responses.RequestsMock(assert_all_requests_are_fired=True) as http:
        auth = matchers.header_matcher({"Authorization": "Bearer tok"})
        http.post(f"{ORCHESTRATOR}/runtimes/reap", json={"reaped": []}, match=[auth])
        http.post(f"{ORCHESTRATOR}/runtimes/health", json={"checked": 0}, match=[auth])
        assert jobs.reap_idle_runtimes(SETTINGS, session) == 200
        assert jobs.check_runtime_health(SETTINGS, session) == 200


@pytest.mark.parametrize("job, blocker", [
    # A plain REFRESH in an open transaction holds the view's ACCESS EXCLUSIVE lock.
    (lambda settings: jobs.refresh_summary(settings), "REFRESH MATERIALIZED VIEW model_performance_summary"),
    (lambda settings: jobs.purge_performance(settings, batch_size=10),
     "LOCK TABLE performance_logs IN ACCESS EXCLUSIVE MODE"),
])
def test_jobs_with_their_own_connection_are_bounded_by_the_statement_timeout(fresh_database_url, job, blocker):
    settings = Settings(database_url=fresh_database_url, db_statement_timeout_ms=200)
    with connect(fresh_database_url) as holder:
        holder.execute(blocker)
        with pytest.raises(pg_errors.QueryCanceled, match="statement timeout"):
            job(settings)


def test_in_process_jobs_on_a_real_database(fresh_database_url, session):
    settings = Settings(database_url=fresh_database_url, performance_retention_days=30)
    with connect(fresh_database_url, autocommit=True) as conn:
        model_id = conn.execute("SELECT id FROM model_registry WHERE name = 'gemma3'").fetchone()["id"]
        conn.execute("""INSERT INTO performance_logs (model_id, task_type, processing_time_ms, success, logged_at)
                        SELECT %s, 'summarization', 100, true, now() - make_interval(days => d)
                        FROM generate_series(0, 59) d""", (model_id,))
        conn.execute("UPDATE optimization_rules SET active = false")
        db = SingleConnectionDatabase(conn)

        assert jobs.purge_performance(settings, batch_size=7) == 30  # days 30..59
        assert jobs.refresh_summary(settings)["refreshed"] is True
        total = conn.execute("SELECT total_requests FROM model_performance_summary WHERE model_id = %s",
                             (model_id,)).fetchone()["total_requests"]
        assert total == 1
        rankings = jobs.update_rankings(db, 86_400)
        assert [m["name"] for m in rankings["updated"]] == ["gemma3"]
        assert jobs.optimize(settings, db, session) == []
