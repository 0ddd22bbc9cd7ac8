"""``mnemo bench decode``: what one image costs to decode, before and after issue 13 (D1), and a burst
against a real ``mnemo serve``.

Part 1, per file and path, each in a fresh interpreter so its peak resident memory is its own:

* ``before``: the request path as it was — Pillow decodes the whole image, it becomes float32 at full
  size, and is resized as floats (``image_to_pixels`` + ``prepare_pixels``), with no check for missing
  rows;
* ``after``: the request path now — header first, ``decode_for_model`` (missing rows refused; a large
  image shrunk before it becomes float: JPEG DCT scaling, Pillow's ``reduce`` in 8 bits down to 3–6 times
  the model's size), then ``prepare_pixels``.

Files: a 40 MP (8000×5000) RGB PNG and the same picture as a JPEG, the issue's 126-byte PNG that
declares 8000×5000 with two rows of data, and a complete 8000×5000 PNG of zero rows (116 KB). The model
is a 256 px RGB one (DAAD 256's input). Reported: median seconds of ``repeats`` decodes and the peak
resident memory above the interpreter's baseline.

Part 3: CPU ms per decode of photo-like PNGs (64 px gray, 256 px RGB, 1920×1080 RGB) with every PNG's
rows counted before decoding, as until session 32, against the rule now (counted first only for a
bomb-shaped file, otherwise only when the decoded last row is blank), alternated in one process.

Part 2 (skip with ``--no-service``): ``mnemo serve`` on the shipped brick bundle, then four concurrent
requests of two complete 40 MP PNGs each (the most the default ``MNEMO_MAX_REQUEST_PIXELS`` admits), and
the issue's burst (four requests of sixteen 126-byte files), each while a client sends one small image
after another: wall time, the small client's worst latency, the server's peak and final resident memory.

A benchmark, not a test: timings depend on the machine (recorded in the results).
"""

from __future__ import annotations

import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

MODEL = {"channels": 3, "size": 256, "mean": [0.5], "std": [0.5], "resize": "resize"}
WIDTH, HEIGHT = 8000, 5000
REPO = Path(__file__).resolve().parents[1]
FILES = {
    "png": "40 MP PNG (8000×5000 RGB, smooth pattern)",
    "jpeg": "40 MP JPEG (the same picture, quality 90)",
    "tiny": "126-byte PNG declaring 8000×5000 RGB, two rows of data (issue 13)",
    "zeros": "complete 8000×5000 RGB PNG of zero rows",
}


# ---------------------------------------------------------------------------------------------- inputs


def zero_rows_png(width: int, height: int, rows: int) -> bytes:
    """A PNG declaring width×height 8-bit RGB whose one IDAT holds ``rows`` zero rows, compressed at 9."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\0" * (1 + 3 * width)
    idat = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_inputs(work: Path) -> dict[str, Path]:
    """The four files, written once into ``work``."""
    import numpy as np
    from PIL import Image

    work.mkdir(parents=True, exist_ok=True)
    paths = {name: work / f"decode-{name}.{'jpg' if name == 'jpeg' else 'png'}" for name in FILES}
    if not paths["png"].is_file() or not paths["jpeg"].is_file():
        y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
        red = (128 + 60 * np.sin(x / 50) * np.cos(y / 70)).astype(np.uint8)
        picture = Image.fromarray(np.stack([red, np.roll(red, 100, axis=0), red // 2 + 40], axis=-1))
        picture.save(paths["png"])
        picture.save(paths["jpeg"], quality=90)
    if not paths["tiny"].is_file():
        paths["tiny"].write_bytes(zero_rows_png(WIDTH, HEIGHT, 2))
    if not paths["zeros"].is_file():
        paths["zeros"].write_bytes(zero_rows_png(WIDTH, HEIGHT, HEIGHT))
    return paths


# ------------------------------------------------------------------------------------- part 1: decode


def decode_once(path_kind: str, data: bytes) -> str:
    """One decode to model input along ``before`` or ``after``; the outcome ("ok" or the error reason)."""
    from PIL import Image, ImageFile

    from mnemo import imaging

    prep = imaging.Preprocessing.from_dict(MODEL)
    try:
        if path_kind == "before":
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > imaging.DEFAULT_MAX_PIXELS:
                    return "too_large"
                image.load()
                pixels = imaging.image_to_pixels(image)
            imaging.prepare_pixels(pixels, prep)
        else:
            with imaging.open_image(data) as opened:
                imaging.prepare_pixels(imaging.decode_for_model(opened, prep), prep)
    except imaging.ImageDecodeError as exc:
        return exc.reason
    except OSError:
        return "truncated"
    return "ok"


def measure(path_kind: str, file: Path, repeats: int) -> dict[str, Any]:
    """In this interpreter: decode ``file`` ``repeats`` times; seconds and peak memory above baseline."""
    import gc

    data = file.read_bytes()
    decode_once(path_kind, b"")  # imports done before the baseline is taken
    gc.collect()
    baseline = _status_mb("VmRSS")
    _reset_peak()
    seconds, outcome = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        outcome = decode_once(path_kind, data)
        seconds.append(time.perf_counter() - start)
    return {
        "seconds": round(statistics.median(seconds), 4),
        "peak_mb": round(_status_mb("VmHWM") - baseline, 1),
        "outcome": outcome,
    }


def _status_mb(key: str, pid: int | str = "self") -> float:
    """A ``/proc/PID/status`` memory line in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak(pid: int | str = "self") -> None:
    """Start VmHWM over from the current resident size (Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def measure_in_child(path_kind: str, file: Path, repeats: int) -> dict[str, Any]:
    code = (
        "import json, sys; from pathlib import Path; from mnemo.benchmarks.decode import measure; "
        "print(json.dumps(measure(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, path_kind, str(file), str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- part 2: service


def service_bursts(files: dict[str, Path]) -> list[dict[str, Any]]:
    """Two bursts against a real ``mnemo serve`` on bundles/brick, a small client probing throughout."""
    from mnemo.benchmarks.loadgen import image_body

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "mnemo", "serve", "--model-dir", str(REPO / "bundles" / "brick")]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1/models/brick:score"
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz")
        small = _small_png()
        for _ in range(5):
            _post(url, small, "image/png")
        bursts = []
        for name, file, copies in (
            ("4 requests × 2 complete 40 MP PNGs", files["zeros"], 2),
            ("4 requests × 16 of the 126-byte file (the issue's burst)", files["tiny"], 16),
        ):
            body, content_type = image_body(file.read_bytes(), copies)
            baseline = _status_mb("VmRSS", server.pid)
            _reset_peak(server.pid)
            statuses: list[int] = []

            def attack(
                body: bytes = body, content_type: str = content_type, out: list[int] = statuses
            ) -> None:
                out.append(_post(url, body, content_type)[0])

            threads = [threading.Thread(target=attack) for _ in range(4)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            latencies = []
            while any(thread.is_alive() for thread in threads) or not latencies:
                latencies.append(_post(url, small, "image/png")[1])
            seconds = time.perf_counter() - start
            time.sleep(1.0)
            bursts.append(
                {
                    "burst": name,
                    "statuses": sorted(statuses),
                    "seconds": round(seconds, 2),
                    "small_requests": len(latencies),
                    "small_worst_s": round(max(latencies), 3),
                    "rss_before_mb": round(baseline),
                    "rss_peak_mb": round(_status_mb("VmHWM", server.pid)),
                    "rss_after_mb": round(_status_mb("VmRSS", server.pid)),
                }
            )
        return bursts
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} was not ready within {timeout_s:g} s")


def _post(url: str, body: bytes, content_type: str) -> tuple[int, float]:
    """(status, seconds) of one POST."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        error.read()
        status = error.code
    return status, time.perf_counter() - start


def _small_png() -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(80, 160, (64, 64), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------ part 3: counting a PNG's rows

GRAY_64 = {"channels": 1, "size": 64, "mean": [0.5], "std": [0.5], "resize": "resize"}
PHOTOS = {  # what: (width, height, channels, the model's preprocessing)
    "64×64 gray PNG, 64 px gray model (brick)": (64, 64, 1, GRAY_64),
    "256×256 RGB PNG, 256 px RGB model (DAAD 256)": (256, 256, 3, MODEL),
    "1920×1080 RGB PNG, 256 px RGB model": (1920, 1080, 3, MODEL),
}
RULES = ("counted first", "counted when the last row is blank")


def photo_png(width: int, height: int, channels: int) -> bytes:
    """A camera-like PNG: a smooth pattern under sensor noise (it compresses 1.3–2 ×, as photos do)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 128 + 60 * np.sin(x / 40) * np.cos(y / 55)
    noise = np.random.default_rng(0).normal(0, 6, (height, width, channels))
    pixels = np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


def row_check_costs(rounds: int = 5, seconds: float = 0.3) -> list[dict[str, Any]]:
    """CPU ms per decode to model input of photo-like PNGs under the two rules for catching missing rows
    (``imaging._load``): every PNG's rows counted before Pillow decodes it (a second inflate; forced with
    ``PNG_COUNT_FIRST_RATIO = 0``), against the rule now. Rules alternate ``rounds`` times in this process,
    each turn about ``seconds`` of decodes; the median turn is kept."""
    from mnemo import imaging

    ratio, rows = imaging.PNG_COUNT_FIRST_RATIO, []
    try:
        for what, (width, height, channels, model) in PHOTOS.items():
            data, prep = photo_png(width, height, channels), imaging.Preprocessing.from_dict(model)
            turns: dict[str, list[float]] = {rule: [] for rule in RULES}
            for _ in range(rounds):
                for rule, rule_ratio in zip(RULES, (0, ratio), strict=True):
                    imaging.PNG_COUNT_FIRST_RATIO = rule_ratio
                    decode = partial(imaging.preprocess, data, prep)
                    turns[rule].append(_cpu_ms_per_call(decode, seconds))
            costs = {rule: round(statistics.median(values), 2) for rule, values in turns.items()}
            rows.append({"what": what, "bytes": len(data), **costs})
            print(f"{what}: {costs}", flush=True)
    finally:
        imaging.PNG_COUNT_FIRST_RATIO = ratio
    return rows


def _cpu_ms_per_call(call: Any, seconds: float) -> float:
    call()
    start, calls = time.process_time(), 0
    while time.process_time() - start < seconds:
        call()
        calls += 1
    return (time.process_time() - start) / calls * 1e3


# ---------------------------------------------------------------------------------------------- report


def run(results: Path, work: Path, *, repeats: int = 3, service: bool = True) -> dict[str, Any]:
    """Both parts; writes ``decode.json`` and ``decode.md`` into ``results``."""
    from mnemo import imaging
    from mnemo.benchmarks.accuracy import git_commit, machine

    files = make_inputs(work)
    rows = []
    for name, file in files.items():
        row: dict[str, Any] = {"file": name, "what": FILES[name], "bytes": file.stat().st_size}
        for path_kind in ("before", "after"):
            row[path_kind] = measure_in_child(path_kind, file, repeats)
        rows.append(row)
        print(f"{name}: before {row['before']}, after {row['after']}", flush=True)
    report = {
        "model": MODEL,
        "repeats": repeats,
        "count_first_ratio": imaging.PNG_COUNT_FIRST_RATIO,
        "decode": rows,
        "row_check": row_check_costs(),
        "service": service_bursts(files) if service else [],
        "machine": machine(),
        "commit": git_commit(REPO),
        "date": time.strftime("%Y-%m-%d"),
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "decode.json").write_text(json.dumps(report, indent=2) + "\n")
    (results / "decode.md").write_text(render(report))
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Decoding cost: before and after issue 13 (D1)",
        "",
        f"`mnemo bench decode` ({report['date']}, commit {report['commit']}; {_machine(report['machine'])}). "
        "Model "
        f"input {report['model']['size']} px RGB. Per file and path: median of {report['repeats']} decodes "
        "in a fresh interpreter, and its peak resident memory above the interpreter's baseline. *Before*: "
        "the whole image as float32, resized as floats, missing rows not detected; *after*: header first, "
        "missing rows refused, shrunk before it becomes float (JPEG DCT scaling, Pillow's reduce in 8 bits "
        "down to 3–6 times the model's size).",
        "",
        "| file | bytes | before: s | before: peak MB | after: s | after: peak MB | after: outcome |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["decode"]:
        b, a = row["before"], row["after"]
        before_outcome = "" if b["outcome"] == "ok" else f" ({b['outcome']})"
        lines.append(
            f"| {row['what']} | {row['bytes']:,} | {b['seconds']:.3f}{before_outcome} | {b['peak_mb']:.0f} | "
            f"{a['seconds']:.3f} | {a['peak_mb']:.0f} | {a['outcome']} |"
        )
    if report.get("row_check"):
        lines += [
            "",
            "## Counting a PNG's rows",
            "",
            "Pillow accepts a PNG whose data ends cleanly before the last row and fills the rest with zeros, "
            "so mnemo counts the rows its data inflates to (a second inflate). Counted first, for every PNG, "
            "it was up to a third of a photo's decode; now a PNG is counted before decoding only when its "
            f"rows are over {report['count_first_ratio']} × its size (a bomb's shape), otherwise after "
            "Pillow's decode and only when the last row came out all zero. CPU ms per decode to model input "
            "(`imaging.preprocess`), photo-like files (a pattern under sensor noise), the two rules "
            "alternated five times in one process, median turn:",
            "",
            f"| file | bytes | {RULES[0]}: ms | {RULES[1]}: ms | ratio |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in report["row_check"]:
            first, now = row[RULES[0]], row[RULES[1]]
            lines.append(f"| {row['what']} | {row['bytes']:,} | {first} | {now} | {now / first:.2f} |")
    if report["service"]:
        lines += [
            "",
            "## A real `mnemo serve` under a burst",
            "",
            "Shipped brick bundle, default settings (`MNEMO_DECODE_CONCURRENCY` 4: large images get 3 slots; "
            "`MNEMO_MAX_REQUEST_PIXELS` 80 MP). Four requests at once, while one client sends a 64 px PNG "
            "after another. Issue 13 measured the second burst before the fix: 34–38 s a request, 4.3 GB "
            "peak, the small request waited 33 s, and resident memory stayed 0.5–0.9 GB afterwards.",
            "",
            "| burst | answers | seconds | small requests (worst s) | RSS before / peak / 1 s after, MB |",
            "| --- | --- | --- | --- | --- |",
        ]
        for burst in report["service"]:
            answers = ", ".join(f"{s}×{burst['statuses'].count(s)}" for s in sorted(set(burst["statuses"])))
            lines.append(
                f"| {burst['burst']} | {answers} | {burst['seconds']} | {burst['small_requests']} "
                f"({burst['small_worst_s']}) | {burst['rss_before_mb']} / {burst['rss_peak_mb']} / "
                f"{burst['rss_after_mb']} |"
            )
    return "\n".join(lines) + "\n"


def _machine(facts: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in facts.items())


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m mnemo.benchmarks.decode", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--work", default="runs/bench-decode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-service", action="store_true")
    args = parser.parse_args(argv)
    run(Path(args.results), Path(args.work), repeats=args.repeats, service=not args.no_service)
    return 0


if __name__ == "__main__":
    sys.exit(main())
