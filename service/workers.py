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
  parent removes on exit, or the next supervisor when the parent was killed outright), so ``/metrics``
  from any worker adds up every worker's counters and histograms. Gauges say how they combine
  (``service/metrics.py``); ``Supervisor`` takes a gone worker's gauges out (counters stay counted);
* **reloads**: ``POST /v1/admin/reload`` reloads the worker that answers it, then, when a bundle was
  loaded or removed, asks the parent (SIGHUP) to replace every worker, so all of them serve the directory
  as it is now within a few seconds (``request_rolling_restart`` says when it does not).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import multiprocess
from uvicorn.supervisors import Multiprocess

from mnemo.service.server import (
    AnswerWhenShutDown,
    GuardedHttpToolsProtocol,
    configure_protocol,
    server_options,
)

WORKER_FLAGS_ENV = "MNEMO_WORKER_FLAGS"  # the parent's flags, as JSON, for its workers' Settings
SUPERVISOR_ENV = "MNEMO_SUPERVISOR_PID"  # set in workers: whom to ask for a rolling restart
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when it is imported
STARTUP_FAILURE = 3  # uvicorn's exit code for a worker that could not start serving
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")  # prometheus_client's per-process live gauges
METRICS_DIR_PREFIX = "mnemo-metrics-"  # then the supervisor's pid and a dash: whose directory it is


class WorkerProtocol(GuardedHttpToolsProtocol):
    """The guarded protocol uvicorn imports by name in a worker; ``worker_app`` sets its limits."""


class Supervisor(Multiprocess):
    """uvicorn's supervisor, plus: a worker that is gone (killed, or retired by a restart) leaves the
    combined gauges at once, as prometheus_client asks of a parent (``mark_process_dead``), even one that
    could not clean up itself; and SIGHUPs that arrive together cause one rolling restart, not one each."""

    def __init__(self, config: Any, sockets: list, metrics_dir: Path, start_timeout_s: float) -> None:
        super().__init__(config, sockets)
        self.metrics_dir, self.start_timeout_s = metrics_dir, start_timeout_s

    def handle_signals(self) -> None:
        hups = [sig for sig in self.signal_queue if sig == signal.SIGHUP]
        for extra in hups[1:]:
            self.signal_queue.remove(extra)
        super().handle_signals()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._forget_gone_workers()

    def restart_all(self) -> None:
        """uvicorn waits ``timeout_worker_healthcheck`` for each new worker to serve, and for every health
        ping too; only the first may be long (loading models), or a worker dying between pings would hold
        the supervisor, signals included, for as long."""
        ping_timeout = self.config.timeout_worker_healthcheck
        self.config.timeout_worker_healthcheck = self.start_timeout_s
        try:
            super().restart_all()
        finally:
            self.config.timeout_worker_healthcheck = ping_timeout
        self._forget_gone_workers()

    def _forget_gone_workers(self) -> None:
        serving = {process.pid for process in self.processes}
        for path in self.metrics_dir.glob("gauge_live*.db"):
            match = LIVE_GAUGE_FILE.fullmatch(path.name)
            if match and int(match[1]) not in serving:
                multiprocess.mark_process_dead(int(match[1]), str(self.metrics_dir))


def serve_workers(settings: Any, flags: dict[str, Any]) -> int:
    """Bind the port, run ``settings.workers`` service processes on it until SIGTERM/SIGINT; 0 on a clean
    stop, 1 when a worker cannot start (the supervisor then stops rather than restart it for ever)."""
    import uvicorn

    remove_orphaned_metrics_dirs()
    metrics_dir = Path(tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-"))
    os.environ.update(
        {
            WORKER_FLAGS_ENV: json.dumps(flags, default=str),
            SUPERVISOR_ENV: str(os.getpid()),
            METRICS_DIR_ENV: str(metrics_dir),
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
        supervisor = Supervisor(config, [config.bind_socket()], metrics_dir, settings.worker_start_timeout_s)
        supervisor.run()
        failed = any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if failed else 0


def remove_orphaned_metrics_dirs() -> list[Path]:
    """Remove the metrics directories of supervisors that are gone (killed outright, so their ``finally``
    never ran); without this every SIGKILL leaves a directory of metric files in the temp dir for good.
    Called before this supervisor makes its own, so one named with this process's pid is a predecessor's
    (in a container the supervisor is pid 1 every time)."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = path.name.removeprefix(METRICS_DIR_PREFIX).partition("-")[0]
        if path.is_dir() and not path.is_symlink() and _is_gone(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _is_gone(pid: str) -> bool:
    """Whether ``pid`` (a directory name's part) names no running process but this one; a name that is no
    pid is not ours and is kept."""
    if not (pid.isascii() and pid.isdigit()):
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):  # another user's process; no pid at all
        return False
    return False


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
    return AnswerWhenShutDown(ScoreShortcut(app))


def _stop_with_supervisor() -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies (Linux ``PR_SET_PDEATHSIG``), so a
    supervisor killed outright leaves no orphan serving the port with what it loaded long ago. uvicorn
    starts every worker from the supervisor's main thread, whose end is the supervisor's end."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logging.getLogger("mnemo.service").warning(
            "workers: prctl(PR_SET_PDEATHSIG) failed (errno %d); this worker outlives a killed supervisor",
            ctypes.get_errno(),
        )
    if str(os.getppid()) != os.environ.get(SUPERVISOR_ENV):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def request_rolling_restart(reload: Any) -> bool:
    """After ``reload`` (this worker's ``ReloadReport``), ask the supervisor to replace every worker so
    that all serve what this one now does; True when asked. Not when nothing changed, and not when a
    bundle kept its previous version because its new one failed: a fresh worker has no previous version
    to keep and would drop the model (the others keep serving it; fix the bundle and reload again)."""
    pid = os.environ.get(SUPERVISOR_ENV)
    if not pid or reload.kept or not (reload.loaded or reload.removed):
        return False
    os.kill(int(pid), signal.SIGHUP)
    return True
