"""Outbound HTTP: a requests Session with urllib3 retries and a timeout on every call."""
from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class CappedRetry(Retry):
    """Retry that honours a Retry-After of up to MAX_RETRY_AFTER_S: a receiver asking for an hour
    would otherwise hold the calling thread (a queue worker, say) that long."""

    MAX_RETRY_AFTER_S = 10.0

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), self.MAX_RETRY_AFTER_S)


class TimeoutSession(requests.Session):
    """A Session that never waits forever: a call without `timeout=` gets the default."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.default_timeout = timeout_s

    def request(self, method, url, **kwargs):
        kwargs.setdefault("timeout", self.default_timeout)
        return super().request(method, url, **kwargs)


def http_session(*, timeout_s: float = 10.0, retries: int = 2, backoff_s: float = 0.2,
                 retry_methods: frozenset[str] = IDEMPOTENT_METHODS,
                 retry_statuses: tuple[int, ...] = (502, 503, 504),
                 token: str = "", pool_size: int = 32) -> TimeoutSession:
    """A session for calling the other services and model servers.

    Retries connection failures and `retry_statuses` (502/503/504) for idempotent methods only,
    so a POST that reached a model server is never sent twice.
    """
    retry = CappedRetry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff_s,
        status_forcelist=retry_statuses,
        allowed_methods=retry_methods,
        raise_on_status=False,
        respect_retry_after_header=True,
    )
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session = TimeoutSession(timeout_s)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session
