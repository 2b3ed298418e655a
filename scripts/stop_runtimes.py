"""Ask the orchestrator to drain and stop every live runtime it owns (used by scripts/down).

Usage: python scripts/stop_runtimes.py [ORCHESTRATOR_URL]
"""
from __future__ import annotations

import os
import sys

import requests

LIVE = ("starting", "running", "draining")


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ORCHESTRATOR_URL", "http://127.0.0.1:8102")
    session = requests.Session()
    if os.environ.get("DISPATCHER_API_TOKEN"):
        session.headers["Authorization"] = f"Bearer {os.environ['DISPATCHER_API_TOKEN']}"
    try:
        live = [runtime for status in LIVE
                for runtime in session.get(f"{url}/runtimes", params={"status": status, "limit": 100},
                                           timeout=5).json()["items"]]
    except requests.RequestException:
        print("orchestrator not reachable: no runtime to stop through it")
        return 0
    for runtime in live:
        response = session.delete(f"{url}/runtimes/{runtime['id']}", timeout=60)
        print(f"stop runtime {runtime['id']} ({runtime['model_name']}:{runtime['model_version']}):"
              f" {response.status_code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
