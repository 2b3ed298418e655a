"""Stop every live runtime of this deployment (used by scripts/down).

Through the orchestrator, which owns them: it drains and stops each. Then any model server process
still recorded in RUNTIME_DIR (the orchestrator unreachable, refusing, or a runtime it lost) is
stopped directly, as the orchestrator's reconcile would: model servers run in sessions of their
own, so stopping the orchestrator's processes does not reach them.

Usage: python scripts/stop_runtimes.py [ORCHESTRATOR_URL]
"""
from __future__ import annotations

import os
import sys

import requests

from services.common.config import Settings
from services.orchestrator.runtimes import DriverError, driver_for

LIVE = ("starting", "running", "draining")


def stop_through_orchestrator(url: str) -> bool:
    """Whether the orchestrator stopped every live runtime it lists."""
    session = requests.Session()
    if os.environ.get("DISPATCHER_API_TOKEN"):
        session.headers["Authorization"] = f"Bearer {os.environ['DISPATCHER_API_TOKEN']}"
    try:
        live = []
        for status in LIVE:
            response = session.get(f"{url}/runtimes", params={"status": status, "limit": 100}, timeout=5)
            response.raise_for_status()
            live += response.json()["items"]
    except (requests.RequestException, ValueError, KeyError) as exc:
        print(f"could not list runtimes through the orchestrator at {url}: {exc}")
        return False
    stopped = True
    for runtime in live:
        response = session.delete(f"{url}/runtimes/{runtime['id']}", timeout=60)
        stopped &= response.ok
        print(f"stop runtime {runtime['id']} ({runtime['model_name']}:{runtime['model_version']}):"
              f" {response.status_code}")
    return stopped


def stop_recorded_processes(settings: Settings) -> None:
    """Stop the model server processes still recorded in RUNTIME_DIR."""
    if "process" not in settings.runtime_drivers:
        return
    try:
        driver = driver_for("process", settings)
        for found in driver.find_managed():
            if found.alive:
                driver.stop(found.ref)
                print(f"stopped model server of runtime {found.runtime_id} ({found.identity}) directly")
    except DriverError as exc:
        print(f"could not stop recorded model servers: {exc}")


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ORCHESTRATOR_URL", "http://127.0.0.1:8102")
    stopped = stop_through_orchestrator(url)
    stop_recorded_processes(Settings.from_env())
    return 0 if stopped else 1   # containers are stopped only through the orchestrator


if __name__ == "__main__":
    sys.exit(main())
