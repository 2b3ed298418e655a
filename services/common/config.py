"""Settings read once from the environment, with explicit types and defaults for this machine."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

SERVICE_PORTS = {
    "registry": 8101,
    "orchestrator": 8102,
    "prompt_builder": 8103,
    "optimizer": 8104,
}


def _env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    """An integer setting from the environment; a malformed value is an error naming it."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from exc


def _env_list(name: str, default: str) -> tuple[str, ...]:
    raw = os.environ.get(name, default)
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _service_url(service: str) -> str:
    env_name = f"{service.upper()}_URL"
    return os.environ.get(env_name, f"http://127.0.0.1:{SERVICE_PORTS[service]}").rstrip("/")


@dataclass(frozen=True)
class Settings:
    """Everything configurable, parsed from the environment by `Settings.from_env()`."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/dispatcher"
    db_pool_min_size: int = 1
    db_pool_max_size: int = 10
    db_pool_timeout_s: float = 5.0
    db_statement_timeout_ms: int = 30_000
    api_token: str = ""
    log_level: str = "INFO"
    max_request_bytes: int = 1_048_576
    max_prompt_chars: int = 100_000
    http_timeout_s: float = 10.0
    http_retries: int = 2
    registry_url: str = "http://127.0.0.1:8101"
    orchestrator_url: str = "http://127.0.0.1:8102"
    prompt_builder_url: str = "http://127.0.0.1:8103"
    optimizer_url: str = "http://127.0.0.1:8104"
    n8n_url: str = "http://127.0.0.1:5678"
    runtime_drivers: tuple[str, ...] = ("process", "external")
    host_cpu_cores: float = float(os.cpu_count() or 1)
    host_memory_mb: int = 8192
    host_gpu_count: float = 0.0
    docker_url: str = "unix:///var/run/docker.sock"
    # The Docker network model containers join, when the orchestrator runs in a container on it.
    docker_network: str = ""
    runtime_dir: str = str(PROJECT_ROOT / ".run" / "runtimes")
    models_dir: str = str(PROJECT_ROOT / ".run" / "models")
    default_keep_alive_s: int = 300
    performance_retention_days: int = 30
    # A queued request's lease: renewed every queue_lease_renew_s while it runs, so only a dead
    # worker's lease lapses (after queue_lease_s); expired leases are looked for every interval.
    queue_lease_s: float = 30.0
    queue_lease_renew_s: float = 10.0
    queue_reclaim_interval_s: float = 5.0
    # Idle workers wake on NOTIFY; this poll only covers a notification that never came.
    queue_poll_s: float = 1.0

    @classmethod
    def from_env(cls) -> Settings:
        """The settings of the environment; ValueError naming the first variable out of its range."""
        settings = cls._parse_env()
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse, at start, a value no service could run with (a service would otherwise fail later,
        on the first request that needs it)."""
        from services.common.vocabulary import RUNTIME_DRIVERS

        rules = [
            ("RUNTIME_DRIVERS", set(self.runtime_drivers) <= set(RUNTIME_DRIVERS) and bool(self.runtime_drivers),
             f"a comma-separated list of {', '.join(RUNTIME_DRIVERS)}"),
            ("LOG_LEVEL", self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
             "one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
            ("DB_POOL_MAX_SIZE", self.db_pool_max_size >= 1, "at least 1"),
            ("DB_POOL_MIN_SIZE", 0 <= self.db_pool_min_size <= self.db_pool_max_size, "from 0 to DB_POOL_MAX_SIZE"),
            ("DB_POOL_TIMEOUT_S", self.db_pool_timeout_s > 0, "above 0"),
            ("DB_STATEMENT_TIMEOUT_MS", self.db_statement_timeout_ms >= 0, "at least 0 (0: no bound)"),
            ("MAX_REQUEST_BYTES", self.max_request_bytes >= 1, "at least 1"),
            ("MAX_PROMPT_CHARS", self.max_prompt_chars >= 1, "at least 1"),
            ("HTTP_TIMEOUT_S", self.http_timeout_s > 0, "above 0"),
            ("HTTP_RETRIES", self.http_retries >= 0, "at least 0"),
            ("HOST_CPU_CORES", self.host_cpu_cores > 0, "above 0"),
            ("HOST_MEMORY_MB", self.host_memory_mb >= 1, "at least 1"),
            ("HOST_GPU_COUNT", self.host_gpu_count >= 0, "at least 0"),
            ("DEFAULT_KEEP_ALIVE_S", self.default_keep_alive_s >= -1, "at least -1 (-1: never stop)"),
            ("PERFORMANCE_RETENTION_DAYS", self.performance_retention_days >= 1, "at least 1"),
            ("QUEUE_LEASE_S", self.queue_lease_s > 0, "above 0"),
            ("QUEUE_LEASE_RENEW_S", 0 < self.queue_lease_renew_s < self.queue_lease_s,
             "above 0 and below QUEUE_LEASE_S (a lease renewed later than it lapses is lost)"),
            ("QUEUE_RECLAIM_INTERVAL_S", self.queue_reclaim_interval_s > 0, "above 0"),
            ("QUEUE_POLL_S", self.queue_poll_s > 0, "above 0"),
        ]
        for name, holds, what in rules:
            if not holds:
                raise ValueError(f"environment variable {name} must be {what}")

    @classmethod
    def _parse_env(cls) -> Settings:
        return cls(
            database_url=_env_str("DATABASE_URL", cls.database_url),
            db_pool_min_size=env_int("DB_POOL_MIN_SIZE", cls.db_pool_min_size),
            db_pool_max_size=env_int("DB_POOL_MAX_SIZE", cls.db_pool_max_size),
            db_pool_timeout_s=_env_float("DB_POOL_TIMEOUT_S", cls.db_pool_timeout_s),
            db_statement_timeout_ms=env_int("DB_STATEMENT_TIMEOUT_MS", cls.db_statement_timeout_ms),
            api_token=_env_str("DISPATCHER_API_TOKEN", ""),
            log_level=_env_str("LOG_LEVEL", cls.log_level).upper(),
            max_request_bytes=env_int("MAX_REQUEST_BYTES", cls.max_request_bytes),
            max_prompt_chars=env_int("MAX_PROMPT_CHARS", cls.max_prompt_chars),
            http_timeout_s=_env_float("HTTP_TIMEOUT_S", cls.http_timeout_s),
            http_retries=env_int("HTTP_RETRIES", cls.http_retries),
            registry_url=_service_url("registry"),
            orchestrator_url=_service_url("orchestrator"),
            prompt_builder_url=_service_url("prompt_builder"),
            optimizer_url=_service_url("optimizer"),
            n8n_url=_env_str("N8N_URL", cls.n8n_url).rstrip("/"),
            runtime_drivers=_env_list("RUNTIME_DRIVERS", ",".join(cls.runtime_drivers)),
            host_cpu_cores=_env_float("HOST_CPU_CORES", float(os.cpu_count() or 1)),
            host_memory_mb=env_int("HOST_MEMORY_MB", cls.host_memory_mb),
            host_gpu_count=_env_float("HOST_GPU_COUNT", cls.host_gpu_count),
            docker_url=_env_str("DOCKER_URL", cls.docker_url),
            docker_network=_env_str("DOCKER_NETWORK", cls.docker_network),
            runtime_dir=_env_str("RUNTIME_DIR", cls.runtime_dir),
            models_dir=_env_str("MODELS_DIR", cls.models_dir),
            default_keep_alive_s=env_int("DEFAULT_KEEP_ALIVE_S", cls.default_keep_alive_s),
            performance_retention_days=env_int("PERFORMANCE_RETENTION_DAYS",
                                                cls.performance_retention_days),
            queue_lease_s=_env_float("QUEUE_LEASE_S", cls.queue_lease_s),
            queue_lease_renew_s=_env_float("QUEUE_LEASE_RENEW_S", cls.queue_lease_renew_s),
            queue_reclaim_interval_s=_env_float("QUEUE_RECLAIM_INTERVAL_S", cls.queue_reclaim_interval_s),
            queue_poll_s=_env_float("QUEUE_POLL_S", cls.queue_poll_s),
        )

    def as_flask_config(self) -> dict:
        """Upper-case keys, the form Flask's `app.config` uses."""
        return {key.upper(): value for key, value in asdict(self).items()}

    @classmethod
    def from_flask_config(cls, config: dict) -> Settings:
        """The settings an app runs with, after `test_config` overrides."""
        return cls(**{f.name: config[f.name.upper()] for f in fields(cls)})


def service_port(service: str) -> int:
    """The port a service listens on: `<SERVICE>_PORT` or its default."""
    return env_int(f"{service.upper()}_PORT", SERVICE_PORTS[service])
