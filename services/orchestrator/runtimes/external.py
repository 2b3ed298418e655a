"""The `external` driver: an endpoint that already runs (e.g. a user's Ollama); never started or stopped."""
from __future__ import annotations

from urllib.parse import urlsplit

from services.orchestrator.runtimes.base import Allocation, Launched, Managed, RuntimeStartError


class ExternalDriver:
    """Tracks health and load of someone else's server; start only records where it is."""

    name = "external"
    manages_lifecycle = False

    def start(self, runtime: dict, model: dict, allocation: Allocation) -> Launched:
        endpoint = str(model["runtime_config"].get("endpoint") or "").rstrip("/")
        parts = urlsplit(endpoint)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:   # out of range
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise RuntimeStartError(
                f"model {model['name']}:{model['version']} uses the external driver but its "
                f"runtime_config has no usable http(s) 'endpoint' (got {endpoint!r})")
        return Launched(endpoint=endpoint, host=parts.hostname, port=port)

    def is_running(self, runtime: dict) -> bool:
        return True  # whether it answers is the readiness probe's business

    def identity(self, runtime: dict) -> str | None:
        return runtime.get("endpoint")

    def stop(self, runtime: dict) -> None:
        return None

    def find_managed(self) -> list[Managed]:
        return []

    def log_tail(self, runtime: dict, max_chars: int = 2000) -> str:
        return ""
