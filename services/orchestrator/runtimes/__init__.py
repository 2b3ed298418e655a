"""Runtime drivers: one interface (`RuntimeDriver`), three ways to run a model server."""
from __future__ import annotations

import hashlib
from functools import lru_cache

from services.common.config import Settings
from services.orchestrator.runtimes.base import (Allocation, DriverError, Launched, Managed,
                                                  RuntimeDriver, RuntimeStartError)

DRIVERS = ("process", "docker", "external")

__all__ = ["Allocation", "DriverError", "Launched", "Managed", "RuntimeDriver", "RuntimeStartError",
           "DRIVERS", "driver_for", "runtime_scope"]


def runtime_scope(settings: Settings) -> str:
    """Which deployment a process or container belongs to: one per database, never its password."""
    from psycopg import conninfo  # not at the top: model servers import this package, and psycopg is slow

    info = conninfo.conninfo_to_dict(settings.database_url)
    where = f"{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"
    return hashlib.sha256(where.encode()).hexdigest()[:12]


@lru_cache(maxsize=32)
def driver_for(name: str, settings: Settings) -> RuntimeDriver:
    """The driver called `name`; an error when this deployment has not enabled it."""
    if name not in settings.runtime_drivers:
        raise DriverError(f"the {name} runtime driver is not enabled here (RUNTIME_DRIVERS="
                          f"{','.join(settings.runtime_drivers)})")
    scope = runtime_scope(settings)
    # Imported on first use: a deployment without Docker never loads the Docker SDK.
    if name == "process":
        from services.orchestrator.runtimes.process import ProcessDriver
        return ProcessDriver(settings, scope)
    if name == "docker":
        from services.orchestrator.runtimes.docker import DockerDriver
        return DockerDriver(settings, scope)
    if name == "external":
        from services.orchestrator.runtimes.external import ExternalDriver
        return ExternalDriver()
    raise DriverError(f"unknown runtime driver {name!r}")
