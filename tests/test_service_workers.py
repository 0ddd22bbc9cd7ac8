"""``mnemo serve --workers 2`` as a user runs it: one port, two service processes under uvicorn's supervisor,
their metrics combined, a reload reaching both, a killed worker replaced, a clean stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mnemo.service.workers import METRICS_DIR_PREFIX, remove_orphaned_metrics_dirs
from tests.image_bytes import png_bytes
from tests.service_helpers import export_tiny_bundle, metric_value, smooth_images
from tests.test_service_cli import start_serving

pytest_plugins = ["tests.service_fixtures"]

PNG = png_bytes(smooth_images(1, 1, 28)[0])


def workers_of(parent: int) -> set[int]:
    """The supervisor's service processes (its children, less multiprocessing's resource tracker)."""
    children, workers = set(), set()
    for task in Path(f"/proc/{parent}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children |= {int(pid) for pid in (task / "children").read_text().split()}
    for pid in children:
        with contextlib.suppress(FileNotFoundError):  # reaped meanwhile
            if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text():
                workers.add(pid)
    return workers


def all_ready(url: str) -> bool:
    """``mnemo_ready`` is the minimum over the workers: 1 once every one of them has loaded its models."""
    return metric_value(httpx.get(f"{url}/metrics").text, "mnemo_ready") == 1


def requests_counted_by(metrics_dir: Path, pid: int) -> float:
    """Score requests one worker counted, from its own file of prometheus_client's multiprocess mode."""
    from prometheus_client.mmap_dict import MmapedDict

    total = 0.0
    for key, value, _, _ in MmapedDict.read_all_values_from_file(str(metrics_dir / f"counter_{pid}.db")):
        if json.loads(key)[1] == "mnemo_requests_total":
            total += value
    return total


def wait_for(check, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def score_on_fresh_connections(url: str, n: int) -> list[int]:
    """``n`` score requests, four at a time, each on its own connection, so the kernel spreads them over
    the workers."""

    def one(_: int) -> int:
        with httpx.Client() as client:
            answer = client.post(
                f"{url}/v1/models/gray:score", content=PNG, headers={"content-type": "image/png"}
            )
            return answer.status_code

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


@pytest.fixture
def two_workers(bundle_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(bundle_dir, models)
    process, url = start_serving("--model-dir", str(models), "--workers", "2")
    try:
        wait_for(lambda: len(workers_of(process.pid)) == 2 and all_ready(url))
        yield process, url, models
    finally:
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
    # its metrics directory outlives it; the next supervisor's sweep removes it, and only it
    left = list(Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}{process.pid}-*"))
    assert len(left) == 1
    assert left[0] in remove_orphaned_metrics_dirs()
    assert not left[0].exists()


def test_the_sweep_keeps_a_running_supervisors_metrics_directory_and_names_that_are_no_pid(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    live = tmp_path / f"{METRICS_DIR_PREFIX}{os.getppid()}-a1"
    not_pids = [tmp_path / f"{METRICS_DIR_PREFIX}{name}-b2" for name in ("x", "9" * 20, "²")]
    mine = tmp_path / f"{METRICS_DIR_PREFIX}{os.getpid()}-c3"  # a predecessor's: in a container, pid 1 again
    for path in (live, *not_pids, mine):
        path.mkdir()
    assert remove_orphaned_metrics_dirs() == [mine]
    assert live.exists() and all(path.exists() for path in not_pids) and not mine.exists()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads the process tree from Linux /proc")
def test_two_workers_share_the_port_and_their_metrics(two_workers):
    process, url, _ = two_workers
    assert score_on_fresh_connections(url, 40) == [200] * 40
    metrics_dir = Path(environment(min(workers_of(process.pid)))["PROMETHEUS_MULTIPROC_DIR"])
    served = [requests_counted_by(metrics_dir, pid) for pid in workers_of(process.pid)]
    assert sum(served) == 40 and min(served) > 0, served  # both workers took requests
    for _ in range(6):  # whichever worker answers the scrape, it counts every worker's requests
        text = httpx.get(f"{url}/metrics").text
        assert metric_value(text, "mnemo_requests_total", model="gray", status="200") == 40
        assert metric_value(text, "mnemo_ready") == 1
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
    assert httpx.post(f"{url}/v1/admin/reload").json()["unchanged"] == ["color", "gray"]
    time.sleep(2)
    assert workers_of(process.pid) == before  # nothing changed: no restart
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
    # the replacement loads, and the killed worker's gauges (it could not clean up) leave the combined view
    wait_for(lambda: all_ready(url))
    metrics_dir = Path(environment(min(workers_of(process.pid)))["PROMETHEUS_MULTIPROC_DIR"])
    assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db"))
    assert score_on_fresh_connections(url, 10) == [200] * 10
