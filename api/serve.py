"""Run the API: `python -m api.serve [--host H] [--port P] [--processes N]`.

N API processes (API_PROCESSES, default 1) serve one port through uvicorn's own
supervisor (`uvicorn.run(..., workers=N)`, what `uvicorn --workers N` does): the parent
binds the socket and starts N children (spawned, each importing `api.main:app` and
running its own lifespan: Redis pool, stream relay, reaper, batch runner); the kernel
hands each new connection to one of them. The parent pings every child and starts a new
one in place of a child that dies or hangs; SIGTERM or SIGINT stops the children (each
ends its streams as on any shutdown: jobs go on, clients resume elsewhere) and then
itself; SIGHUP replaces them one by one, SIGTTIN / SIGTTOU add or remove one.

Every process's Prometheus metrics go to files in one fresh directory
(PROMETHEUS_MULTIPROC_DIR, made here before any child starts, removed at exit), so
`GET /metrics`, whichever process answers it, reports the sum over all of them (see
`api.metrics`). With one process it is the same: the same code path, whatever N is.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

# The API never uses torch (its image has none) but transformers imports it whenever it
# is installed (next to vllm in a development environment): 370 MB more in every API
# process for nothing. Marked missing here, so transformers finds no torch. This module
# runs first in every API process: in the parent as `__main__`, and in each child of
# uvicorn's supervisor as `__mp_main__` (multiprocessing's spawn re-runs the main module
# before unpickling the child's target).
sys.modules.setdefault("torch", None)  # type: ignore[arg-type]

import uvicorn  # noqa: E402

from api import metrics_dir  # noqa: E402
from common.settings import get_settings  # noqa: E402

APP = "api.main:app"
# httptools with a bound on each request head as it arrives (api.limits).
HTTP_PROTOCOL = "api.limits:HeadLimitedHttpToolsProtocol"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m api.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--processes", type=int, default=None, help="default: API_PROCESSES (1)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    processes = args.processes if args.processes is not None else get_settings().api_processes
    if processes < 1:
        parser.error("--processes must be at least 1")
    # A fresh, empty directory each start: files a previous run left would be summed in.
    metrics_dir.remove_stale()
    directory, lock = metrics_dir.make()
    os.environ[MULTIPROC_ENV] = directory  # inherited by every child the supervisor spawns
    # uvicorn re-raises the SIGTERM that stopped it once it has shut down: without a
    # handler of ours that kills the process before the directory is removed.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(
            APP,
            host=args.host,
            port=args.port,
            workers=processes,
            http=HTTP_PROTOCOL,
            log_level=args.log_level,
        )
    finally:
        metrics_dir.close(directory, lock)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
