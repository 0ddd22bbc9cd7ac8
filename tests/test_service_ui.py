"""The upload page at ``/``, driven by headless Chromium against a real server.

The page's ``?sample`` mode draws a synthetic image in a canvas and scores it through the public API,
exactly as the "Try a synthetic sample" button does, so no browser automation library is needed.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service_helpers import metric_value

pytest_plugins = ["tests.service_fixtures"]  # the shared fixtures: bundle_dir, server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium) — UI test skipped"
)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=15000",
]  # fmt: skip


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    profile.mkdir()
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)


def test_page_scores_a_sample_and_shows_verdict_and_overlay(server, tmp_path):
    before = metric_value(httpx.get(f"{server}/metrics").text, "mnemo_images_scored_total", model="color")
    dom = chromium(tmp_path, "--dump-dom", f"{server}/?sample").stdout
    verdict = re.search(r'<body data-scored="(ok|anomalous)"', dom)
    assert verdict, "the page never showed a result"
    assert re.search(rf'<dd id="verdict" class="{verdict[1]}">{verdict[1]}</dd>', dom)
    rebuilt = re.search(
        r'<img id="rebuilt" alt="reconstruction" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom
    )
    assert Image.open(io.BytesIO(base64.b64decode(rebuilt[1]))).size == (
        16,
        16,
    )  # input, reconstruction, heatmap
    overlay = re.search(
        r'<img id="overlay" alt="heatmap overlay" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom
    )
    picture = Image.open(io.BytesIO(base64.b64decode(overlay[1])))
    assert (picture.mode, picture.size) == ("RGB", (16, 16))  # the first listed model: color, 16×16
    assert re.search(r'<figcaption id="scale">heatmap, calibrated: ', dom)  # the bundle's fixed scale
    count = re.search(r'<dd id="regions">(\d+)</dd>', dom)
    boxes = re.findall(
        r'<div class="region"[^>]* style="left: ([\d.]+)px; top: ([\d.]+)px; width: ([\d.]+)px', dom
    )
    assert count and int(count[1]) == len(boxes) >= 1, "the sample's blotch must be boxed"
    assert all(float(left) >= 0 and float(left) + float(width) <= 256.5 for left, _, width in boxes)
    after = metric_value(httpx.get(f"{server}/metrics").text, "mnemo_images_scored_total", model="color")
    assert after == before + 1  # the page really went through the API

    shot = tmp_path / "page.png"
    chromium(tmp_path, "--window-size=900,700", f"--screenshot={shot}", f"{server}/?sample")
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert pixels.shape == (700, 900, 3) and pixels.std() > 10  # something was drawn
