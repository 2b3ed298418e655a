"""The optimizer's scheduler: `python -m services.optimizer.scheduler`, one process, never in a web server.

APScheduler cannot share a job store between processes, so exactly one of these runs.
"""
from __future__ import annotations

import logging
import signal
import sys
from datetime import timezone

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from services.common.config import Settings
from services.common.db import PooledDatabase
from services.common.http import http_session
from services.common.logs import configure_logging
from services.optimizer.jobs import JobConfig, ScheduledJob, logged, scheduled_jobs

logger = logging.getLogger(__name__)


def build_scheduler(jobs: list[ScheduledJob]) -> BlockingScheduler:
    """A scheduler running each job on its interval, never two runs of one job at once."""
    scheduler = BlockingScheduler(timezone=timezone.utc)
    for job in jobs:
        # max_instances=1: an overrunning job is not started again; coalesce: missed runs run once.
        scheduler.add_job(logged(job.id, job.run), IntervalTrigger(seconds=job.interval_s),
                          id=job.id, name=job.id, max_instances=1, coalesce=True,
                          misfire_grace_time=max(job.interval_s // 2, 1))
    return scheduler


def main() -> int:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    db = PooledDatabase(settings.database_url, min_size=1, max_size=2,
                        timeout_s=settings.db_pool_timeout_s,
                        statement_timeout_ms=settings.db_statement_timeout_ms,
                        name="dispatcher-optimizer-scheduler")
    db.open()
    session = http_session(timeout_s=settings.http_timeout_s, retries=settings.http_retries,
                           token=settings.api_token)
    scheduler = build_scheduler(scheduled_jobs(settings, db, session, JobConfig.from_env()))
    signal.signal(signal.SIGTERM, lambda *_: scheduler.shutdown(wait=False))
    logger.info("scheduler starting", extra={"jobs": [job.id for job in scheduler.get_jobs()]})
    try:
        scheduler.start()
    except KeyboardInterrupt:
        pass
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
