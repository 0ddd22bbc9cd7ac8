"""``mnemo bench decode`` (benchmarks/decode.py) on small inputs: its two decode paths, and its report."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mnemo import imaging
from mnemo.benchmarks import decode


def test_both_paths_decode_a_good_image_and_only_after_refuses_missing_rows(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(good, "PNG")
    assert decode.decode_once("before", good.getvalue()) == "ok"
    assert decode.decode_once("after", good.getvalue()) == "ok"
    short = decode.zero_rows_png(400, 300, 2)
    assert decode.decode_once("before", short) == "ok"  # the old path scored it, zero-filled
    assert decode.decode_once("after", short) == "truncated"
    file = tmp_path / "short.png"
    file.write_bytes(short)
    measured = decode.measure("after", file, repeats=2)
    assert measured["outcome"] == "truncated" and measured["seconds"] >= 0 and "peak_mb" in measured


def test_report_lists_every_file_and_burst():
    row = {"seconds": 0.5, "peak_mb": 100.0, "outcome": "ok"}
    report = {
        "model": decode.MODEL,
        "repeats": 3,
        "decode": [
            {"file": n, "what": w, "bytes": 1, "before": row, "after": row} for n, w in decode.FILES.items()
        ],
        "service": [
            {
                "burst": "b",
                "statuses": [200, 200, 400],
                "seconds": 1.0,
                "small_requests": 3,
                "small_worst_s": 0.1,
                "rss_before_mb": 1,
                "rss_peak_mb": 2,
                "rss_after_mb": 1,
            }
        ],
        "count_first_ratio": 16,
        "row_check": [{"what": "w", "bytes": 2048, decode.RULES[0]: 4.0, decode.RULES[1]: 3.0}],
        "machine": {"cpu": "x", "cores": 2},
        "commit": "abc",
        "date": "2026-01-01",
    }
    text = decode.render(report)
    assert all(what in text for what in decode.FILES.values())
    assert "| b | 200×2, 400×1 | 1.0 | 3 (0.1) | 1 / 2 / 1 |" in text
    assert "| w | 2,048 | 4.0 | 3.0 | 0.75 |" in text and "over 16 ×" in text


def test_the_row_check_costs_time_both_rules_and_restore_the_setting(monkeypatch):
    monkeypatch.setattr(decode, "PHOTOS", {"small": (32, 24, 3, decode.MODEL)})
    ratio = imaging.PNG_COUNT_FIRST_RATIO
    (row,) = decode.row_check_costs(rounds=1, seconds=0.01)
    assert row["what"] == "small" and row["bytes"] > 0
    assert all(row[rule] > 0 for rule in decode.RULES)
    assert ratio == imaging.PNG_COUNT_FIRST_RATIO
