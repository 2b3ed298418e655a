"""Run llama.cpp's HTTP server (xllamacpp) on one model file until the process is ended.

Usage: python -m services.orchestrator.runtimes.llama_server --model-path FILE --port N
       [--threads T] [--parallel P] [--ctx C] [--alias NAME] [--memory-mb M]

Standalone on purpose (the standard library and xllamacpp only): the docker model-server image
(scripts/model-image/build-rootfs) copies this one file in and runs it as a script.
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import threading
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--alias", default="model")
    parser.add_argument("--memory-mb", type=int, default=0,
                        help="cap on the process's private writable memory (RLIMIT_DATA); 0 = none "
                             "(the process driver passes 0 when the server's cgroup limits it)")
    return parser.parse_args(argv)


def limit_memory(memory_mb: int) -> None:
    """Cap heap and anonymous memory, not the mmap'd model file (RLIMIT_AS would count it)."""
    # A failed allocation aborts llama.cpp; no gdb backtrace and no core file, just the log line.
    os.environ["GGML_NO_BACKTRACE"] = "1"
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit_memory(args.memory_mb)
    import xllamacpp as xlc  # after the limit, so the library's own allocations count too

    params = xlc.CommonParams()
    params.model.path = args.model_path
    params.model_alias = {args.alias}  # a set of names in this llama.cpp
    params.n_ctx = args.ctx
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.n_parallel = args.parallel
    params.hostnames = [args.host]
    params.port = args.port
    server = xlc.Server(params)  # noqa: F841 - serves in its own threads until the process ends
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"llama_server: serving {args.alias} on {args.host}:{args.port} (ready at {time.time():.6f})", flush=True)
    stop.wait()
    # The lifecycle drains requests before it stops a runtime. llama.cpp's own shutdown would wait
    # for kept-alive client connections to close (up to its read timeout), so end at once instead.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
