"""Review capture (MNEMO_CAPTURE_DIR) against a real uvicorn server: what is kept, in which form, within
which size, and that neither a slow disk nor a broken one ever touches a request."""

from __future__ import annotations

import json
import threading
import time

import httpx

from mnemo.service.capture import Capture, CaptureStore
from tests.image_bytes import png_bytes
from tests.service_helpers import make_settings, metric_value, running_server, smooth_images
from tests.test_service_api import post_files

pytest_plugins = ["tests.service_fixtures"]
NEVER, ALWAYS = {"threshold": 1e9}, {"threshold": -1e9}  # force the verdict ok / anomalous


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the capture never appeared"
        time.sleep(0.02)


def images(n: int, seed: int = 0) -> list[bytes]:
    return [png_bytes(image) for image in smooth_images(n, 1, 28, seed=seed)]


def test_anomalous_images_are_kept_as_uploaded_with_their_answer(bundle_dir, tmp_path):
    capture = tmp_path / "capture"
    anomalous, ok = images(2)
    with running_server(make_settings(bundle_dir, capture_dir=capture)) as url:
        sent = post_files(url, "gray", [anomalous], **ALWAYS).json()["results"][0]
        post_files(url, "gray", [ok], **NEVER)
        wait_for(lambda: len(list(capture.glob("gray/anomalous/*"))) == 2)
        metrics = httpx.get(f"{url}/metrics").text
    (image,) = capture.glob("gray/anomalous/*.png")
    assert image.read_bytes() == anomalous  # the upload itself, not a re-encoding
    record = json.loads(image.with_suffix(".json").read_text())
    assert record["verdict"] == "anomalous" and record["score"] == sent["score"] and record["model"] == "gray"
    assert record["filename"] == "img0.png" and record["threshold"] == -1e9 and "version" in record
    assert not (capture / "gray" / "ok").exists()  # MNEMO_CAPTURE_OK_FRACTION is 0 by default
    assert metric_value(metrics, "mnemo_captured_total", model="gray", verdict="anomalous") == 1


def test_a_share_of_ok_images_and_the_size_cap_drops_the_oldest(bundle_dir, tmp_path):
    capture = tmp_path / "capture"
    batch = images(8, seed=1)
    one = len(batch[0]) + 400  # an image and its JSON record, about
    settings = make_settings(bundle_dir, capture_dir=capture, capture_ok_fraction=1.0,
                             capture_max_mb=3 * one / 2**20)  # fmt: skip
    with running_server(settings) as url:
        for image in batch:
            post_files(url, "gray", [image], **NEVER)
        wait_for(lambda: metric_value(httpx.get(f"{url}/metrics").text, "mnemo_captured_total",
                                      model="gray", verdict="ok") == 8)  # fmt: skip
    kept = sorted(capture.glob("gray/ok/*.png"))
    total = sum(p.stat().st_size for p in capture.rglob("*") if p.is_file())
    assert total <= 3 * one and 1 <= len(kept) < 8
    assert kept[-1].read_bytes() == batch[-1]  # the newest stays, the oldest went first


def test_a_broken_capture_folder_never_fails_a_request(bundle_dir, tmp_path):
    capture = tmp_path / "capture"
    with running_server(make_settings(bundle_dir, capture_dir=capture)) as url:
        (capture / "gray").write_text("a file where the model's folder should be")
        answers = [post_files(url, "gray", [image], **ALWAYS) for image in images(3, seed=2)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        wait_for(lambda: metric_value(httpx.get(f"{url}/metrics").text, "mnemo_capture_dropped_total",
                                      reason="write_failed") == 3)  # fmt: skip


def test_a_full_queue_drops_instead_of_waiting(tmp_path):
    release = threading.Event()
    dropped: list[str] = []

    class SlowDisk(CaptureStore):
        def _write(self, capture):
            release.wait(10)
            super()._write(capture)

    store = SlowDisk(tmp_path, max_bytes=2**20, queue_size=1, on_dropped=dropped.append)
    item = Capture("m", "1", "anomalous", b"\x89PNG not really", {"score": 1.0})
    started = time.monotonic()
    for _ in range(5):  # the queue holds one (and the writer one, if it took it yet): the rest drop at once
        store.offer(item)
    assert time.monotonic() - started < 1.0 and dropped.count("queue_full") in (3, 4)
    release.set()
    store.close()
    assert len(list(tmp_path.glob("m/anomalous/*.json"))) == 5 - len(dropped)
    assert store.offer(Capture("m", "1", "ok", b"", {})) is None and not (tmp_path / "m" / "ok").exists()
