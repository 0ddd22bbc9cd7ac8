"""``mnemo bench failover``: two ``mnemo serve`` replicas behind HAProxy (``docker/haproxy/haproxy.cfg``,
the reference balancer config), steady load through the balancer, and one replica killed (SIGKILL)
mid-run (issue 15). Reports what the clients saw: requests sent, failed (anything but 200), retried by the
balancer (its ``X-Mnemo-Retries`` header), and how long after the kill requests still needed a retry
(the time until the balancer stopped sending to the dead replica). ``balanced`` does the same in front of
replicas started elsewhere: CI's Docker stage runs two containers of the image and ``docker kill``s one
(``docker/ci_checks.py failover``).

Needs ``haproxy`` (Debian: ``apt-get install haproxy``). A benchmark and a test alike: the suite runs it
short (``tests/test_replicas.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnemo.benchmarks.serve import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "docker" / "haproxy" / "haproxy.cfg"


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout_s} s")


def post(url: str, body: bytes) -> tuple[int, str, int]:
    """(status, the replica that answered, the balancer's retries); status 0: the connection failed."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()
            status, headers = answer.status, answer.headers
    except urllib.error.HTTPError as exc:
        status, headers = exc.code, exc.headers
    except OSError:
        return 0, "", 0  # the connection itself failed: the worst a client can see
    return status, headers.get("X-Mnemo-Replica", ""), int(headers.get("X-Mnemo-Retries") or 0)


def run(
    bundle: Path, image: bytes, model: str, duration: float = 8.0, kill_at: float = 3.0, clients: int = 8
) -> dict[str, Any]:
    """Two ``mnemo serve`` processes on this machine behind the balancer; the first one SIGKILLed."""
    ports = [free_port() for _ in range(2)]
    serve_env = {**os.environ, "MNEMO_INTRA_OP_THREADS": "1"}  # two replicas share the cores
    command = [sys.executable, "-m", "mnemo", "serve", "--model-dir", str(bundle), "--log-level", "warning"]
    replicas = [
        subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=REPO,
            env=serve_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        addresses = [f"127.0.0.1:{port}" for port in ports]
        kill = replicas[0].kill  # SIGKILL: no graceful shutdown, as when a machine dies
        return balanced(addresses, kill, image, model, duration, kill_at, clients)
    finally:
        for process in replicas:
            if process.poll() is None:
                process.terminate()
                process.wait(10)


def balanced(
    replicas: list[str],
    kill: Callable[[], object],
    image: bytes,
    model: str,
    duration: float = 8.0,
    kill_at: float = 3.0,
    clients: int = 8,
) -> dict[str, Any]:
    """The reference HAProxy in front of two running ``replicas`` (host:port, the first is the one
    ``kill()`` stops at ``kill_at`` seconds: a process here, a container in CI's Docker stage), load
    through it, and what the clients saw."""
    haproxy = os.environ.get("HAPROXY", "haproxy")
    port = free_port()
    env = {
        **os.environ,
        "MNEMO_BALANCER_BIND": f"127.0.0.1:{port}",
        "MNEMO_REPLICA_1": replicas[0],
        "MNEMO_REPLICA_2": replicas[1],
    }
    for replica in replicas:
        wait_ready(f"http://{replica}/readyz")
    balancer = subprocess.Popen(
        [haproxy, "-db", "-f", str(CONFIG)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/readyz")
        time.sleep(1.5)  # both replicas through their first health checks
        return _load(url + f"/v1/models/{model}:score", image, kill, duration, kill_at, clients)
    finally:
        balancer.terminate()
        balancer.wait(10)


def _load(url: str, image: bytes, kill: Callable[[], object], duration: float, kill_at: float, clients: int):
    records: list[tuple[float, int, str, int]] = []  # (time, status, replica, retries)
    lock = threading.Lock()
    started = time.monotonic()
    stop = started + duration

    def client() -> None:
        while time.monotonic() < stop:
            status, replica, retries = post(url, image)
            with lock:
                records.append((time.monotonic() - started, status, replica, retries))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(kill_at)
    kill()
    killed = time.monotonic() - started
    for thread in threads:
        thread.join()
    after = [r for r in records if r[0] >= killed]
    retried_after = [r[0] for r in after if r[3] > 0]
    return {
        "clients": clients,
        "seconds": duration,
        "killed_at_s": round(killed, 2),
        "sent": len(records),
        "failed": sum(r[1] != 200 for r in records),
        "failed_statuses": sorted({r[1] for r in records if r[1] != 200}),
        "retried": sum(r[3] > 0 for r in records),
        "answered_by": {name: sum(r[2] == name for r in records) for name in ("replica1", "replica2")},
        "answered_by_victim_after_kill": sum(r[2] == "replica1" for r in after),
        "retries_needed_for_s_after_kill": round(max(retried_after) - killed, 2) if retried_after else 0.0,
    }


def write(result: dict[str, Any], results: Path) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "failover.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Failover: two replicas behind HAProxy, one killed under load",
        "",
        f"`mnemo bench failover` ({result['clients']} closed-loop clients, {result['seconds']} s, replica 1 "
        f"killed with SIGKILL at {result['killed_at_s']} s; docker/haproxy/haproxy.cfg).",
        "",
        "| sent | failed (client saw non-200) | retried by the balancer | answered by replica 1 / 2 | "
        "retries needed for, after the kill |",
        "| --- | --- | --- | --- | --- |",
        f"| {result['sent']} | {result['failed']} {result['failed_statuses'] or ''} | {result['retried']} | "
        f"{result['answered_by']['replica1']} / {result['answered_by']['replica2']} | "
        f"{result['retries_needed_for_s_after_kill']} s |",
    ]
    (results / "failover.md").write_text("\n".join(lines) + "\n")
