"""Send one real dispatch to a running orchestrator and print the answer and the decision.

Usage: python scripts/first_dispatch.py [ORCHESTRATOR_URL]
"""
from __future__ import annotations

import json
import os
import sys

import requests

REQUEST = {
    "prompt": "In one sentence: why is the sky blue?",
    "task_type": "question-answering",
    "complexity": "low",
    "max_tokens": 48,
    "temperature": 0.2,
    "seed": 7,
}


def main() -> int:
    url = (sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ORCHESTRATOR_URL", "http://127.0.0.1:8102"))
    headers = {"Authorization": f"Bearer {os.environ['DISPATCHER_API_TOKEN']}"} \
        if os.environ.get("DISPATCHER_API_TOKEN") else {}
    print(f"POST {url}/dispatch {json.dumps(REQUEST)}")
    response = requests.post(f"{url}/dispatch", json=REQUEST, headers=headers, timeout=300)
    body = response.json()
    if response.status_code != 200:
        print(f"dispatch failed: {response.status_code} {json.dumps(body, indent=2)}", file=sys.stderr)
        return 1
    decision = body["decision"]
    print(f"\nanswer ({body['model']['name']}:{body['model']['version']}, valid={body['valid']}):")
    print(f"  {body['response']}")
    print(f"\ndecision: {decision['why']}")
    for candidate in decision["candidates"]:
        parts = ", ".join(f"{k}={v}" for k, v in candidate["breakdown"].items())
        print(f"  {candidate['model']:<32} score={candidate['score']:<7} {parts}")
    for group in decision["filtered"]:
        print(f"  filtered: {group['count']} {group['reason']}")
    timings = ", ".join(f"{k}={v:.0f}" for k, v in body["timings"].items())
    print(f"\ntimings (ms): {timings}")
    print(f"request id: {body['request_id']}  (GET {url}/requests/{body['request_id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
