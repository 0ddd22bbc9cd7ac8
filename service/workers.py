"""Several service processes on one port (``MNEMO_WORKERS`` > 1), under uvicorn's own supervisor.

One process parses HTTP, decodes and answers on a single event loop while its inference thread runs the
model; on small models the event loop is the limit (issue 17: about 0.6 ms of Python per request against
0.5 ms of inference, one core each, and the two hand the GIL back and forth). N workers accept from one
listening socket that the parent binds, so the kernel spreads connections over N event loops and N
inference lanes. Each worker is a whole service: it loads every bundle, batches its own requests and
answers ``/readyz`` for itself; memory grows by one service (~120 MB for brick) per worker.

uvicorn's ``Multiprocess`` supervisor starts the workers, restarts one that dies or stops answering its
health pings, and on SIGTERM/SIGINT stops them all gracefully; SIGHUP replaces them one by one, each
replacement serving before the worker it replaces retires. The parent stays small: it never imports the
app or a model runtime.

What the workers share, and how:

* **settings**: the parent's flags travel as JSON in ``WORKER_FLAGS_ENV``; everything else is the same
  environment, so each worker builds the same ``Settings``;
* **metrics**: prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a fresh directory the
  parent removes on exit), so ``/metrics`` from any worker adds up every worker's counters and histograms.
  Gauges say how they combine (``service/metrics.py``); a worker killed outright leaves its last gauge
  values until the service restarts (counters are unaffected);
* **reloads**: ``POST /v1/admin/reload`` reloads the worker that answers it, then asks the parent (SIGHUP)
  to replace every worker, so all of them serve the directory as it is now within a few seconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from mnemo.service.server import GuardedHttpToolsProtocol, configure_protocol, server_options

WORKER_FLAGS_ENV = "MNEMO_WORKER_FLAGS"  # the parent's flags, as JSON, for its workers' Settings
SUPERVISOR_ENV = "MNEMO_SUPERVISOR_PID"  # set in workers: whom to ask for a rolling restart
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when it is imported
STARTUP_FAILURE = 3  # uvicorn's exit code for a worker that could not start serving
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class WorkerProtocol(GuardedHttpToolsProtocol):
    """The guarded protocol uvicorn imports by name in a worker; ``worker_app`` sets its limits."""


def serve_workers(settings: Any, flags: dict[str, Any]) -> int:
    """Bind the port, run ``settings.workers`` service processes on it until SIGTERM/SIGINT; 0 on a clean
    stop, 1 when a worker cannot start (the supervisor then stops rather than restart it for ever)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="mnemo-metrics-")
    os.environ.update(
        {
            WORKER_FLAGS_ENV: json.dumps(flags, default=str),
            SUPERVISOR_ENV: str(os.getpid()),
            METRICS_DIR_ENV: metrics_dir,
        }
    )
    config = uvicorn.Config(
        "mnemo.service.workers:worker_app",
        factory=True,
        http=f"{__name__}:WorkerProtocol",
        workers=settings.workers,
        **server_options(settings),
    )
    try:
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
        failed = any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if failed else 0


def worker_app() -> Any:
    """In a worker (uvicorn's app factory): the app under the parent's settings, served as
    ``server_config`` serves it (the score shortcut, the guarded protocol with the same limits)."""
    from mnemo.service.app import create_app
    from mnemo.service.score_shortcut import ScoreShortcut
    from mnemo.service.settings import Settings

    _stop_with_supervisor()
    settings = Settings(**json.loads(os.environ.get(WORKER_FLAGS_ENV, "{}")))
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    configure_protocol(WorkerProtocol, settings, app)
    return ScoreShortcut(app)


def _stop_with_supervisor() -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies (Linux ``PR_SET_PDEATHSIG``), so a
    supervisor killed outright leaves no orphan serving the port with what it loaded long ago."""
    libc = ctypes.util.find_library("c")
    if libc is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(libc).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if str(os.getppid()) != os.environ.get(SUPERVISOR_ENV):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def request_rolling_restart() -> bool:
    """Ask the supervisor to replace every worker (after a reload); False when not under one."""
    pid = os.environ.get(SUPERVISOR_ENV)
    if not pid:
        return False
    os.kill(int(pid), signal.SIGHUP)
    return True
