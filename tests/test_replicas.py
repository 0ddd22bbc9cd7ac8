"""Two real replicas behind a real HAProxy with the reference config; one is killed under load and the
clients must not notice (``mnemo bench failover``, run short)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install -y haproxy) — skipped"
)


def test_killing_a_replica_under_load_fails_no_client_request(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mnemo", "bench", "failover", "--bundle", str(ROOT / "bundles" / "brick"),
         "--seconds", "5", "--kill-at", "2", "--results", str(tmp_path)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "failover.json").read_text())
    assert result["sent"] > 100 and result["failed"] == 0, result  # retried in the balancer, not failed
    assert result["answered_by"]["replica1"] > 0 and result["answered_by"]["replica2"] > 0  # both served
    assert result["retries_needed_for_s_after_kill"] < 3.0  # health checks took the dead one out
    assert "| sent |" in (tmp_path / "failover.md").read_text()
