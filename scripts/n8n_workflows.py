"""Import the dispatcher's n8n workflows into an n8n, or export them back as stable JSON.

    scripts/n8n-import [--with-schedules] [FILE ...]     create or update workflows and credentials
    scripts/n8n-export [--name NAME ...] [--output DIR]  write n8n/workflows/<verb_noun>.json
    n8n_workflows.py bundle --output DIR [--with-schedules] [FILE ...]
                                                         the same, as files for n8n's own CLI

Import and export talk to n8n's public API: N8N_URL (default http://127.0.0.1:5678) and
N8N_API_KEY (create one in n8n under Settings > n8n API). `bundle` needs no n8n: it writes what
scripts/n8n-import-bundle feeds to `n8n import:credentials`, `n8n import:workflow` and
`n8n publish:workflow` (docker-compose.yml's n8n does so at each start). Both create the
credentials from the environment (N8N_WEBHOOK_TOKEN, required: the secret webhook callers send,
and the orchestrator with the async flow's callback to a Wait node's resume URL; DISPATCHER_API_TOKEN,
ORCHESTRATOR_URL), so no secret or credential id is ever in a workflow file. n8n's own environment
needs N8N_WEBHOOK_TOKEN too: the async flow reads it there ($env) to hand it to the orchestrator.
Standard library only: it runs with any Python 3.11.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import NamedTuple

WORKFLOW_DIR = Path(__file__).resolve().parents[1] / "n8n" / "workflows"
# Node ids and webhook ids are derived from the workflow and node names, so files diff cleanly.
ID_NAMESPACE = uuid.UUID("6f1c1d4e-2b7a-4c55-9a1e-0d5e8f3b7c21")
GRID = 20
# n8n's own ids are 16 characters of this alphabet (its generateNanoId).
N8N_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
N8N_ID_LENGTH = 16


class Credential(NamedTuple):
    """An n8n credential the import creates; nodes refer to it by type and name."""

    type: str
    name: str


# One credential per role: the webhook secret and the services' token are both header credentials.
API_CREDENTIAL = Credential("httpHeaderAuth", "Dispatcher API")
WEBHOOK_CREDENTIAL = Credential("httpHeaderAuth", "Dispatcher webhooks")
OLLAMA_CREDENTIAL = Credential("ollamaApi", "Dispatcher Ollama front door")
CREDENTIALS = (API_CREDENTIAL, WEBHOOK_CREDENTIAL, OLLAMA_CREDENTIAL)

WEBHOOK_TOKEN_VARIABLE = "N8N_WEBHOOK_TOKEN"
WEBHOOK_TYPE = "n8n-nodes-base.webhook"
WAIT_TYPE = "n8n-nodes-base.wait"
OLLAMA_CHAT_TYPE = "@n8n/n8n-nodes-langchain.lmChatOllama"
SCHEDULE_TYPE = "n8n-nodes-base.scheduleTrigger"
TOP_LEVEL_KEYS = ("name", "nodes", "connections", "settings")
NODE_KEYS = ("id", "name", "type", "typeVersion", "position", "parameters", "webhookId",
             "onError", "alwaysOutputData", "retryOnFail", "maxTries", "waitBetweenTries",
             "executeOnce", "disabled", "notes", "notesInFlow")


class N8nError(RuntimeError):
    """n8n refused a call or could not be reached."""


class ImportRefused(ValueError):
    """The environment or a workflow is not fit to import; nothing was sent to n8n."""


class N8nClient:
    """The few calls of n8n's public API (v1) this script needs."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/") + "/api/v1"
        self.api_key = api_key
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
        url = self.base_url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers={
            "X-N8N-API-KEY": self.api_key, "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise N8nError(f"{method} {path}: {error.code} {error.read().decode(errors='replace')[:500]}") from None
        except urllib.error.URLError as error:
            raise N8nError(f"{method} {path}: {error.reason}") from None
        return json.loads(raw) if raw else {}

    def list_all(self, path: str, query: dict | None = None) -> list[dict]:
        items, cursor = [], None
        while True:
            page = self.call("GET", path, query={**(query or {}), "limit": 250, **({"cursor": cursor} if cursor else {})})
            items += page.get("data", [])
            cursor = page.get("nextCursor")
            if not cursor:
                return items


# --- files ------------------------------------------------------------------------------------

def load_workflow(path: Path) -> dict:
    return json.loads(path.read_text())


def dump_workflow(workflow: dict) -> str:
    """The committed form: sorted keys, two-space indent, a final newline."""
    return json.dumps(workflow, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def workflow_files(names: list[str] | None = None) -> list[Path]:
    files = [Path(name) for name in names] if names else sorted(WORKFLOW_DIR.glob("*.json"))
    if not files:
        raise SystemExit(f"no workflow files in {WORKFLOW_DIR}")
    return files


def stable_id(workflow_name: str, node_name: str, kind: str = "node") -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"{kind}/{workflow_name}/{node_name}"))


def strip_workflow(workflow: dict) -> dict:
    """A workflow as n8n returns it, reduced to what is committed: no ids, credentials or state."""
    name = workflow["name"]
    nodes = []
    for node in sorted(workflow["nodes"], key=lambda n: n["name"]):
        kept = {key: node[key] for key in NODE_KEYS if key in node}
        kept["id"] = stable_id(name, node["name"])
        if "webhookId" in node:
            kept["webhookId"] = stable_id(name, node["name"], "webhook")
        kept["position"] = [round(v / GRID) * GRID for v in node.get("position", [0, 0])]
        nodes.append(kept)
    settings = {"executionOrder": workflow.get("settings", {}).get("executionOrder", "v1")}
    return {"name": name, "nodes": nodes, "connections": workflow["connections"], "settings": settings}


def with_credentials(workflow: dict, credential_ids: dict[Credential, str]) -> dict:
    """The workflow with each node that authenticates pointed at the imported credential of its role."""
    nodes = []
    for node in workflow["nodes"]:
        credential = credential_of(node)
        if credential:
            node = {**node, "credentials": {credential.type: {"id": credential_ids[credential],
                                                              "name": credential.name}}}
        nodes.append(node)
    return {**{key: workflow[key] for key in TOP_LEVEL_KEYS}, "nodes": nodes}


def credential_of(node: dict) -> Credential | None:
    """The credential a node authenticates with, chosen by its role (None when it needs none)."""
    parameters = node.get("parameters", {})
    if node["type"] == WEBHOOK_TYPE:
        if parameters.get("authentication") != "headerAuth":
            raise ImportRefused(f"webhook {node['name']!r} does not use header auth: anyone could call it")
        return WEBHOOK_CREDENTIAL
    if node["type"] == WAIT_TYPE:
        return wait_credential(node)
    if node["type"] == OLLAMA_CHAT_TYPE:
        return OLLAMA_CREDENTIAL
    if parameters.get("authentication") == "genericCredentialType":
        if parameters.get("genericAuthType") != API_CREDENTIAL.type:
            raise ImportRefused(f"node {node['name']!r} needs a {parameters.get('genericAuthType')!r} credential,"
                                " which the import does not create")
        return API_CREDENTIAL
    return None


def wait_credential(node: dict) -> Credential | None:
    """A Wait node resumed by a call to its resume URL (an n8n URL with a sequential execution id,
    unsigned) requires the webhook token, as webhooks do."""
    parameters = node.get("parameters", {})
    resume = parameters.get("resume", "timeInterval")
    if resume == "webhook":
        if parameters.get("incomingAuthentication") != "headerAuth":
            raise ImportRefused(f"wait node {node['name']!r} resumes on a webhook without header auth:"
                                " anyone could resume it")
        return WEBHOOK_CREDENTIAL
    if resume == "form":   # a form can only take basic auth, and the import creates no such credential
        raise ImportRefused(f"wait node {node['name']!r} resumes on a form, which cannot require the webhook token")
    return None


def check_importable(workflow: dict) -> None:
    """Refuse a workflow with an open webhook or resume URL, or a credential the import does not create."""
    for node in workflow["nodes"]:
        try:
            credential_of(node)
        except ImportRefused as error:
            raise ImportRefused(f"{workflow['name']!r}: {error}") from None


def has_trigger(workflow: dict, node_type: str) -> bool:
    return any(node["type"] == node_type for node in workflow["nodes"])


def activates(workflow: dict, with_schedules: bool) -> bool:
    """Whether the import activates a workflow: webhook flows always, schedule flows only when asked."""
    return has_trigger(workflow, WEBHOOK_TYPE) or (with_schedules and has_trigger(workflow, SCHEDULE_TYPE))


def load_importable(files: list[Path], environ: dict[str, str]) -> tuple[dict[Credential, dict], list[dict]]:
    """The credentials' data and the workflows, or ImportRefused (missing webhook token, open webhook or
    resume URL)."""
    data = credential_data(environ)
    workflows = [load_workflow(path) for path in files]
    for workflow in workflows:
        check_importable(workflow)
    return data, workflows


# --- import -----------------------------------------------------------------------------------

def webhook_token(environ: dict[str, str]) -> str:
    """The secret every webhook caller must send; without one the import would open the webhooks to anyone."""
    token = environ.get(WEBHOOK_TOKEN_VARIABLE, "")
    if not token:
        raise ImportRefused(f"set {WEBHOOK_TOKEN_VARIABLE}: webhook callers must send 'Authorization: Bearer <it>'"
                            " (make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if not re.fullmatch(r"[\x21-\x7e]+", token):
        raise ImportRefused(f"{WEBHOOK_TOKEN_VARIABLE} must be printable ASCII without spaces: it is sent in a header")
    return token


def credential_data(environ: dict[str, str]) -> dict[Credential, dict]:
    """What each credential holds, taken from the environment."""
    token = environ.get("DISPATCHER_API_TOKEN", "")
    orchestrator = environ.get("ORCHESTRATOR_URL", "http://127.0.0.1:8102").rstrip("/")
    return {
        # Without a token the services ignore the header; n8n needs a non-empty value.
        API_CREDENTIAL: {"name": "Authorization", "value": f"Bearer {token or 'none'}"},
        WEBHOOK_CREDENTIAL: {"name": "Authorization", "value": f"Bearer {webhook_token(environ)}"},
        OLLAMA_CREDENTIAL: {"baseUrl": orchestrator, "apiKey": token},
    }


def upsert_credentials(client: N8nClient, data: dict[Credential, dict]) -> dict[Credential, str]:
    """Create or update the credentials; their ids."""
    existing = {(c["type"], c["name"]): c["id"] for c in client.list_all("/credentials")}
    ids = {}
    for credential in CREDENTIALS:
        body = {"name": credential.name, "type": credential.type, "data": data[credential]}
        if credential in existing:
            client.call("PATCH", f"/credentials/{existing[credential]}", body)
            ids[credential] = existing[credential]
        else:
            ids[credential] = client.call("POST", "/credentials", body)["id"]
    return ids


def import_workflows(client: N8nClient, files: list[Path], environ: dict[str, str], *,
                     with_schedules: bool = False, log=print) -> dict[str, str]:
    """Create or update every workflow (matched by name) and activate the triggered ones; ids by name.

    Refuses (ImportRefused) before any call to n8n when the webhook token is missing or a workflow
    has an open webhook or resume URL.
    """
    data, workflows = load_importable(files, environ)
    credential_ids = upsert_credentials(client, data)
    existing = {w["name"]: w for w in client.list_all("/workflows")}
    ids = {}
    for loaded in workflows:
        workflow = with_credentials(loaded, credential_ids)
        current = existing.get(workflow["name"])
        if current:
            saved = client.call("PUT", f"/workflows/{current['id']}", workflow)
        else:
            saved = client.call("POST", "/workflows", workflow)
        ids[workflow["name"]] = saved["id"]
        activate = activates(workflow, with_schedules)
        if activate:
            client.call("POST", f"/workflows/{saved['id']}/activate")
        log(f"{'updated' if current else 'created'} {workflow['name']!r} ({saved['id']})"
            f"{', active' if activate else ''}")
    return ids


# --- bundle for n8n's CLI -----------------------------------------------------------------------

BUNDLE_CREDENTIALS = "credentials.json"
BUNDLE_WORKFLOWS = "workflows"
BUNDLE_PUBLISH = "publish"


def n8n_id(kind: str, name: str) -> str:
    """An id in n8n's own format derived from a name: `n8n import:*` upserts by id, so a re-import
    updates in place instead of adding a copy."""
    number = int.from_bytes(hashlib.sha256(f"{kind}/{name}".encode()).digest(), "big")
    chars = []
    for _ in range(N8N_ID_LENGTH):
        number, index = divmod(number, len(N8N_ID_ALPHABET))
        chars.append(N8N_ID_ALPHABET[index])
    return "".join(chars)


def credential_ids_for_bundle() -> dict[Credential, str]:
    return {credential: n8n_id(f"credential/{credential.type}", credential.name) for credential in CREDENTIALS}


def write_bundle(output: Path, files: list[Path], environ: dict[str, str], *, with_schedules: bool = False,
                 log=print) -> list[str]:
    """Write the credentials, the workflows and the ids of those to publish; those ids.

    `data` is plain JSON: `n8n import:credentials` encrypts it with the instance's key. Refuses
    (ImportRefused) before writing anything, like the import through the API.
    """
    data, workflows = load_importable(files, environ)
    credential_ids = credential_ids_for_bundle()
    workflow_dir = output / BUNDLE_WORKFLOWS
    workflow_dir.mkdir(parents=True, exist_ok=True)
    for stale in workflow_dir.glob("*.json"):   # a workflow file removed since the last bundle
        stale.unlink()
    published = []
    for path, loaded in zip(files, workflows, strict=True):
        workflow = {"id": n8n_id("workflow", loaded["name"]), **with_credentials(loaded, credential_ids)}
        (workflow_dir / path.name).write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n")
        publish = activates(workflow, with_schedules)
        if publish:
            published.append(workflow["id"])
        log(f"bundled {workflow['name']!r} ({workflow['id']}){', to publish' if publish else ''}")
    credentials = [{"id": credential_ids[credential], "name": credential.name, "type": credential.type,
                    "data": data[credential]} for credential in CREDENTIALS]
    (output / BUNDLE_CREDENTIALS).write_text(json.dumps(credentials, indent=2) + "\n")
    (output / BUNDLE_PUBLISH).write_text("".join(f"{workflow_id}\n" for workflow_id in published))
    return published


# --- export -----------------------------------------------------------------------------------

def file_name_for(name: str, known: dict[str, str]) -> str:
    """The file a workflow is written to: the one that holds its name, else a slug of the name."""
    if name in known:
        return known[name]
    return (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "workflow") + ".json"


def export_workflows(client: N8nClient, names: list[str] | None = None, output: Path = WORKFLOW_DIR,
                     log=print) -> list[Path]:
    """Write the named workflows (default: those with a file here) in their committed form."""
    known = {load_workflow(path)["name"]: path.name for path in WORKFLOW_DIR.glob("*.json")}
    wanted = set(names or known)
    written = []
    for summary in client.list_all("/workflows"):
        if summary["name"] not in wanted:
            continue
        workflow = client.call("GET", f"/workflows/{summary['id']}", query={"excludePinnedData": "true"})
        path = output / file_name_for(workflow["name"], known)
        path.write_text(dump_workflow(strip_workflow(workflow)))
        written.append(path)
        log(f"exported {workflow['name']!r} to {path}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser("import", help="create or update the workflows and credentials")
    bundler = commands.add_parser("bundle", help="write the credentials and workflows for n8n's own import commands")
    bundler.add_argument("--output", type=Path, required=True, help="folder (created if missing)")
    for command in (importer, bundler):
        command.add_argument("files", nargs="*", help="workflow files (default: n8n/workflows/*.json)")
        command.add_argument("--with-schedules", action="store_true",
                             help="also activate the schedule workflows (they then run on their own)")
    exporter = commands.add_parser("export", help="write the workflows back as stable JSON")
    exporter.add_argument("--name", action="append", help="a workflow name (repeatable)")
    exporter.add_argument("--output", type=Path, default=WORKFLOW_DIR, help="folder (default: n8n/workflows)")
    args = parser.parse_args(argv)

    try:
        if args.command == "bundle":
            write_bundle(args.output, workflow_files(args.files), dict(os.environ), with_schedules=args.with_schedules)
            return 0
        api_key = os.environ.get("N8N_API_KEY")
        if not api_key:
            parser.error("set N8N_API_KEY (n8n: Settings > n8n API > Create an API key)")
        client = N8nClient(os.environ.get("N8N_URL", "http://127.0.0.1:5678"), api_key)
        if args.command == "import":
            import_workflows(client, workflow_files(args.files), dict(os.environ), with_schedules=args.with_schedules)
        else:
            export_workflows(client, args.name, args.output)
    except ImportRefused as error:
        parser.error(str(error))
    except N8nError as error:
        print(f"n8n: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
