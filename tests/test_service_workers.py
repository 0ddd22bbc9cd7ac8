"""``mnemo serve --workers 2`` as a user runs it: one port, two service processes under uvicorn's supervisor,
their metrics combined, a reload reaching both, a killed worker replaced, a clean stop."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.image_bytes import png_bytes
from tests.service_helpers import export_tiny_bundle, metric_value, smooth_images
from tests.test_service_cli import start_serving

pytest_plugins = ["tests.service_fixtures"]

PNG = png_bytes(smooth_images(1, 1, 28)[0])


def workers_of(parent: int) -> set[int]:
    """The supervisor's service processes (its children, less multiprocessing's resource tracker)."""
    children = set()
    for task in Path(f"/proc/{parent}/task").iterdir():
        children |= {int(pid) for pid in (task / "children").read_text().split()}
    return {pid for pid in children if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()}


def wait_for(check, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def score_on_fresh_connections(url: str, n: int) -> list[int]:
    """``n`` score requests, each on its own connection, so the kernel spreads them over the workers."""
    statuses = []
    for _ in range(n):
        with httpx.Client() as client:
            answer = client.post(
                f"{url}/v1/models/gray:score", content=PNG, headers={"content-type": "image/png"}
            )
            statuses.append(answer.status_code)
    return statuses


@pytest.fixture
def two_workers(bundle_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(bundle_dir, models)
    process, url = start_serving("--model-dir", str(models), "--workers", "2")
    wait_for(lambda: len(workers_of(process.pid)) == 2)
    yield process, url, models
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux /proc")
def test_workers_stop_when_their_supervisor_is_killed(two_workers):
    process, _, _ = two_workers
    workers = workers_of(process.pid)
    process.kill()
    process.communicate(timeout=30)  # returns once the workers, which hold its output pipe, are gone too
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux /proc")
def test_two_workers_share_the_port_and_their_metrics(two_workers):
    process, url, _ = two_workers
    assert score_on_fresh_connections(url, 30) == [200] * 30
    for _ in range(6):  # whichever worker answers the scrape, it counts every worker's requests
        text = httpx.get(f"{url}/metrics").text
        assert metric_value(text, "mnemo_requests_total", model="gray", status="200") == 30
        assert metric_value(text, "mnemo_ready") == 1
    metrics_dir = Path(environment(min(workers_of(process.pid)))["PROMETHEUS_MULTIPROC_DIR"])
    assert metrics_dir.is_dir()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert not metrics_dir.exists()  # the parent removes the workers' shared metric files


def environment(pid: int) -> dict[str, str]:
    pairs = (pair.decode().partition("=") for pair in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    return {key: value for key, _, value in pairs if key}


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux /proc")
def test_a_reload_reaches_every_worker(two_workers):
    process, url, models = two_workers
    before = workers_of(process.pid)
    export_tiny_bundle(models, "late", spec="gray")
    answer = httpx.post(f"{url}/v1/admin/reload")
    assert answer.status_code == 200 and answer.json()["loaded"] == ["late"]
    # the supervisor replaces both workers, each new one serving before the old one leaves
    wait_for(lambda: not (workers_of(process.pid) & before) and len(workers_of(process.pid)) == 2, 60)
    for _ in range(8):
        with httpx.Client() as client:
            assert "late" in {m["name"] for m in client.get(f"{url}/v1/models").json()["models"]}
    assert score_on_fresh_connections(url, 10) == [200] * 10


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux /proc")
def test_a_killed_worker_is_replaced_and_the_service_keeps_answering(two_workers):
    process, url, _ = two_workers
    victim = min(workers_of(process.pid))
    os.kill(victim, signal.SIGKILL)
    assert score_on_fresh_connections(url, 10) == [200] * 10  # the other worker serves meanwhile
    wait_for(lambda: victim not in workers_of(process.pid) and len(workers_of(process.pid)) == 2)
    wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200)
    assert score_on_fresh_connections(url, 10) == [200] * 10
