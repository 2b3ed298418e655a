"""Queue workers: `python -m services.orchestrator.worker [--workers N]`.

Each worker thread claims the next pending request (priority, then age; FOR UPDATE SKIP LOCKED,
so no request runs twice), runs it through the pipeline and records the outcome. The statement
recording a completed request claims the next one too, handing it the same runtime while that still
runs: a busy queue costs two statements per request (enqueue, end) beside the model's work. Idle
workers sleep until a NOTIFY announces a request (only while few are pending), a claim leaves
others pending, or a short timeout passes. One thread also reclaims, every
`queue_reclaim_interval_s`, requests whose lease expired because their worker died.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

import psycopg

from services.common.config import Settings, env_int
from services.common.db import Database, PooledDatabase
from services.common.logs import configure_logging
from services.orchestrator import request_queue
from services.orchestrator.pipeline import call_back_failed, run_queued_request

logger = logging.getLogger(__name__)

LISTEN_TIMEOUT_S = 1.0   # how often the listener looks whether the pool is stopping
MAX_ATTEMPTS = 3


class WorkerPool:
    """N threads draining the queue, woken by NOTIFY; `stop()` lets running requests finish."""

    def __init__(self, db: Database, settings: Settings, *, workers: int) -> None:
        self.db = db
        self.settings = settings
        self.workers = workers
        self.stopping = threading.Event()
        # One release per NOTIFY (and per claim passing the word on to an idle worker): a wake-up that
        # arrives while every worker is busy is kept, not lost.
        self.wakeups = threading.Semaphore(0)
        self.idle = 0   # workers waiting for a wake-up
        self.idle_lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        targets = [self._listen, self._reclaim] + [self._work] * self.workers
        for number, target in enumerate(targets):
            thread = threading.Thread(target=target, name=f"{target.__name__}-{number}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stopping.set()
        self.wakeups.release(self.workers)
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def run_once(self, *, spend_wakeup: bool = True) -> bool:
        """Claim and run a request, and the successors its completion claims; False when the queue
        was empty.

        A claim spends one wake-up (a NOTIFY announces one request), unless the caller has just spent
        one waking up for it (`spend_wakeup=False`).
        """
        owner = request_queue.lease_owner()
        with self.db.connection(autocommit=True) as conn:
            row = request_queue.claim_next(conn, owner=owner, lease_seconds=self.settings.queue_lease_s)
        if row is None:
            return False
        claimed = request_queue.Claim(self.settings.queue_lease_s, row, more_pending=row.pop("more_pending"))
        while claimed.row is not None:
            if spend_wakeup:
                # Without this, every wake-up left over from a busy spell would cost an empty claim
                # once the queue runs dry.
                self.wakeups.acquire(blocking=False)
            spend_wakeup = True
            if claimed.more_pending:   # enqueues behind a backlog NOTIFY no one: pass the word on
                self._wake_an_idle_worker()
            claimed = self._run(claimed, owner)
        return True

    def _run(self, claimed: request_queue.Claim, owner: str) -> request_queue.Claim:
        """Run a claimed request; the next one, if the statement completing it claimed one."""
        row = claimed.row
        successor = request_queue.Claim(self.settings.queue_lease_s)
        # Not after a request with a callback: the next one would wait for the call, its lease not renewed.
        hand_over = not (self.stopping.is_set() or row.get("callback_url"))
        try:
            run_queued_request(self.db, self.settings, row, owner=owner, inheritance=claimed.inheritance,
                               successor=successor if hand_over else None)
        except Exception:
            logger.exception("request failed unexpectedly", extra={"dispatch_id": str(row["id"])})
        return successor

    def _work(self) -> None:
        woken = False   # by a wake-up this thread has spent
        while not self.stopping.is_set():
            try:
                claimed = self.run_once(spend_wakeup=not woken)
            except psycopg.Error:
                logger.exception("queue unavailable; retrying")
                claimed = False
            if claimed:
                woken = False
                continue
            with self.idle_lock:
                self.idle += 1
            try:
                woken = self.wakeups.acquire(timeout=self.settings.queue_poll_s)
            finally:
                with self.idle_lock:
                    self.idle -= 1

    def _wake_an_idle_worker(self) -> None:
        with self.idle_lock:
            if self.idle:
                self.wakeups.release()

    def _listen(self) -> None:
        """Turn NOTIFYs into wake-ups, so a new request starts at once rather than at the next poll."""
        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {request_queue.CHANNEL}")
                    while not self.stopping.is_set():
                        for _ in conn.notifies(timeout=LISTEN_TIMEOUT_S):
                            self.wakeups.release()
            except psycopg.Error:
                logger.warning("listener lost its connection; reconnecting")
                self.stopping.wait(1.0)

    def _reclaim(self) -> None:
        while not self.stopping.wait(self.settings.queue_reclaim_interval_s):
            try:
                self.reclaim_once()
            except psycopg.Error:
                logger.exception("reclaim failed; retrying")

    def reclaim_once(self) -> list[dict]:
        """Take back the requests of lost workers: wake workers for those pending again, and call
        back those that end here (no worker will)."""
        with self.db.connection() as conn:
            reclaimed = request_queue.reclaim_expired(conn, max_attempts=MAX_ATTEMPTS)
        if reclaimed:
            logger.warning("reclaimed requests of lost workers", extra={"requests": len(reclaimed)})
        if pending := sum(row["status"] == "pending" for row in reclaimed):
            self.wakeups.release(pending)
        for row in reclaimed:
            if row["status"] == "failed":
                call_back_failed(row, row["error_details"])
        return reclaimed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run queue workers.")
    parser.add_argument("--workers", type=int, default=env_int("QUEUE_WORKERS", 4))
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    db = PooledDatabase(settings.database_url, min_size=1, max_size=args.workers + 2,
                        statement_timeout_ms=settings.db_statement_timeout_ms, name="dispatcher-worker")
    db.open()
    pool = WorkerPool(db, settings, workers=args.workers)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    pool.start()
    logger.info("workers started", extra={"workers": args.workers})
    stop.wait()
    pool.stop()
    db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
