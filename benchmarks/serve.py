"""``mnemo bench serve``: the service's throughput against the hardware limit of the same bundle.

Per bundle, in one run: (1) raw ONNX Runtime in-process on already-normalised arrays, every batch size up to
64 (median call time), keeping the best images/s (the limit) and batch-1 latency; (2) a real ``mnemo serve``
subprocess with dynamic batching; (3) the same with ``--max-batch-size 1``; (4) dynamic batching again,
each request carrying ``burst`` images (a multipart upload, as a camera sending a burst would). (2) and (3)
send one PNG per request, with the service's default ONNX Runtime settings (threads and spinning chosen
by the model's cost, ``service/backends.py``); with ``--spinning``, (5) dynamic batching with
``MNEMO_ORT_SPINNING=1``, the threads spinning whatever the model; with ``--no-keep-alive``, (6) dynamic
batching with every request on a fresh connection (``Connection: close``), as a camera that connects per
frame would send them.
Headline: service images/s ÷ raw images/s at the best batch size, the raw figure re-timed (at the sweep's
best two sizes) right before and after each service point (their mean), so the ratio is side by side on a
machine whose speed drifts.

The load generator runs on the same CPU as the server, so on a small box the client's own CPU use is part
of what the service is measured against; the report records the machine so readers can judge.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mnemo.benchmarks.accuracy import git_commit, machine
from mnemo.benchmarks.loadgen import LoadResult, percentiles_ms, run_load
from mnemo.benchmarks.serve_report import write_markdown

REPO = Path(__file__).resolve().parents[1]
RAW_BATCHES = (1, 2, 4, 8, 16, 32, 64)
READY_TIMEOUT_S = 120.0
RAW_BESIDE_BATCHES = 2  # batch sizes re-timed beside each service point: the sweep's best two


# ------------------------------------------------------------------------------------------- bundles


def resolve_bundle(name: str, work: Path) -> tuple[Path, str]:
    """(bundle dir, how it was made) for a known name, exporting it on first use, or a given path."""
    from mnemo.benchmarks import bundles

    if name == "brick":
        return REPO / "bundles" / "brick", "shipped bundles/brick (DAAD, 64 px gray, trained by mnemo demo)"
    if name in bundles.SPECS:
        out = work / name
        if not (out / "manifest.json").is_file():
            bundles.export_untrained(name, out)
        return out, bundles.SPECS[name]["what"]
    return Path(name), "user bundle"


def manifest_of(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def sample_png(manifest: dict[str, Any]) -> bytes:
    """A smooth gradient image at the model's input size, so the service resizes nothing."""
    import io

    from PIL import Image

    pre = manifest["preprocessing"]
    size, channels = pre["size"], pre["channels"]
    ramp = np.linspace(60, 200, size)
    pixels = ((ramp[None, :] + ramp[:, None]) / 2).astype(np.uint8)
    image = Image.fromarray(pixels).convert("RGB" if channels == 3 else "L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- raw


class RawOnnxRuntime:
    """The bundle's graph in this process at ONNX Runtime's defaults (threads may spin, which the service
    turns off so they leave the cores to decoding): the runtime's limit, timed on demand so that a service
    point can be set beside a raw measurement taken just before and after it."""

    def __init__(self, bundle: Path) -> None:
        import onnxruntime as ort

        pre = manifest_of(bundle)["preprocessing"]
        self.shape = (pre["channels"], pre["size"], pre["size"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 0  # the service's default (MNEMO_INTRA_OP_THREADS=0)
        self.session = ort.InferenceSession(
            str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def times(self, batch: int, seconds: float) -> list[float]:
        """Seconds per call on a random batch, after one warm-up call."""
        x = np.random.default_rng(0).standard_normal((batch, *self.shape)).astype(np.float32)
        call = partial(self.session.run, None, {self.input_name: x})
        call()
        return _time_calls(call, seconds)

    def images_per_s(self, batch: int, seconds: float) -> float:
        return batch / float(np.median(self.times(batch, seconds)))

    def best_of(self, batches: list[int], seconds: float) -> float:
        """The best images/s over a few batch sizes: the limit re-timed beside a service point, over the
        sweep's leading sizes because one noisy sweep on a shared machine may rank close sizes wrongly."""
        return max(self.images_per_s(b, seconds) for b in batches)

    def sweep(self, seconds: float) -> dict[str, Any]:
        """Images/s per batch size and batch-1 latency percentiles."""
        per_batch = {b: self.images_per_s(b, seconds) for b in RAW_BATCHES}
        ranked = sorted(per_batch, key=per_batch.get, reverse=True)
        return {
            "images_per_s_by_batch": {str(b): round(v, 1) for b, v in per_batch.items()},
            "best_batch": ranked[0],
            "leading_batches": ranked[:RAW_BESIDE_BATCHES],
            "best_images_per_s": round(per_batch[ranked[0]], 1),
            "single_image_ms": percentiles_ms(self.times(1, seconds)),
        }


def _time_calls(call, seconds: float, most: int = 2000) -> list[float]:
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while (time.perf_counter() < stop or len(times) < 3) and len(times) < most:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


# ------------------------------------------------------------------------------------------- service


def process_cpu_s(pid: int) -> float:
    """CPU seconds a process has used, all threads. Linux's per-thread scheduler clock (nanoseconds, in
    /proc/PID/task/*/schedstat) where it is readable, since the process's own counters tick in 10 ms and a
    short, light run can fall between two ticks; threads that have exited count through those counters."""
    ticks = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    counted = (int(stat[11]) + int(stat[12])) / ticks  # utime, stime (fields 14, 15), exited threads too
    try:
        threads = Path(f"/proc/{pid}/task").iterdir()
        precise = sum(int((t / "schedstat").read_text().split()[0]) for t in threads) / 1e9
    except (OSError, ValueError, IndexError):
        return counted
    return max(counted, precise)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A ``mnemo serve`` subprocess on 127.0.0.1; ``start`` returns seconds from spawn to /readyz 200."""

    def __init__(
        self,
        bundle: Path,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int = 256,
        spinning: bool = False,
        workers: int = 1,
    ) -> None:
        self.spinning, self.workers = spinning, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable, "-m", "mnemo", "serve", "--model-dir", str(bundle), "--port", str(self.port),
            "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
            "--backend", "onnxruntime", "--device", "cpu", "--log-level", "warning",
            "--max-queue", str(max_queue), "--workers", str(workers),
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        started = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k != "MNEMO_ORT_SPINNING"}  # default: auto
        env["PYTHONPATH"] = str(REPO)
        if self.spinning:
            env["MNEMO_ORT_SPINNING"] = "1"
        self.process = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        deadline = started + READY_TIMEOUT_S
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mnemo serve exited with {self.process.returncode}: {' '.join(self.args)}"
                )
            try:
                if self._ready():
                    return time.perf_counter() - started
            except OSError:  # refused while starting, or 503 (HTTPError) until the model is loaded
                pass
            time.sleep(0.05)
        raise RuntimeError(f"mnemo serve not ready after {READY_TIMEOUT_S} s")

    def _ready(self) -> bool:
        """/readyz is 200 (urlopen raises otherwise); with several workers, every one of them is ready
        (``mnemo_ready``, their minimum), not only the one that answered."""
        with urllib.request.urlopen(self.url + "/readyz", timeout=1.0):
            pass
        if self.workers == 1:
            return True
        with urllib.request.urlopen(self.url + "/metrics", timeout=1.0) as answer:
            return "\nmnemo_ready 1.0" in answer.read().decode()

    def pids(self) -> list[int]:
        """The server process and its children (the workers of ``--workers N``), Linux /proc."""
        tasks = Path(f"/proc/{self.process.pid}/task")
        children = [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]
        return [self.process.pid, *children]

    def memory_mb(self) -> dict[str, float]:
        """Resident and peak resident memory of the server process and its workers, added up (Linux
        /proc; the peaks of several processes need not coincide, so theirs is an upper bound)."""
        fields = {"VmRSS": 0.0, "VmHWM": 0.0}
        for pid in self.pids():
            status = Path(f"/proc/{pid}/status")
            for line in status.read_text().splitlines() if status.is_file() else []:
                key, _, value = line.partition(":")
                if key in fields:
                    fields[key] += int(value.split()[0]) / 1024
        return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1)}

    def probe(self, model: str) -> tuple[float, float, float]:
        """(CPU seconds of the server process, all threads; its batch-size sum; its batch count)."""
        cpu = sum(process_cpu_s(pid) for pid in self.pids())
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as answer:
            text = answer.read().decode()
        total = {"sum": 0.0, "count": 0.0}
        for line in text.splitlines():
            for kind in total:
                if line.startswith(f'mnemo_batch_size_{kind}{{model="{model}"}}'):
                    total[kind] = float(line.rsplit(" ", 1)[1])
        return cpu, total["sum"], total["count"]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def service_mode(
    bundle: Path,
    png: bytes,
    max_batch_size: int,
    max_wait_ms: float,
    concurrency: list[int],
    images_per_request: int = 1,
    spinning: bool = False,
    raw_beside: Callable[[], float] | None = None,
    keep_alive: bool = True,
    workers: int = 1,
    **load,
) -> dict[str, Any]:
    """Every concurrency point against one server; ``raw_beside()`` (raw images/s now), timed before the
    first point, between points and after the last, gives each point the mean of the raw figures on either
    side of it, so that its ratio to raw is measured side by side on a shared, drifting machine."""
    # Room for every image the closed loop can have in flight: the bench measures throughput, not the
    # (tested) 503 a full queue answers with.
    queue = max(256, images_per_request * max(concurrency))
    server = Server(bundle, max_batch_size, max_wait_ms, queue, spinning, workers)
    try:
        cold = server.start()
        idle = server.memory_mb()
        name = manifest_of(bundle)["name"]
        url = f"{server.url}/v1/models/{name}:score"
        probe = partial(server.probe, name)
        raw = [raw_beside()] if raw_beside else []
        points = []
        for c in concurrency:
            point = asyncio.run(
                run_load(
                    url,
                    png,
                    c,
                    images_per_request=images_per_request,
                    probe=probe,
                    keep_alive=keep_alive,
                    **load,
                )
            )
            points.append(point.to_dict())
            if raw_beside:
                raw.append(raw_beside())
                points[-1]["raw_images_per_s"] = round((raw[-2] + raw[-1]) / 2, 1)
        return {
            "max_batch_size": max_batch_size,
            "images_per_request": images_per_request,
            "max_wait_ms": max_wait_ms,
            "ort_spinning": True if spinning else "auto",
            "keep_alive": keep_alive,
            "workers": workers,
            "cold_start_s": round(cold, 2),
            "memory_after_load_mb": idle,
            "memory_after_run_mb": server.memory_mb(),
            "points": points,
        }
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ run


def bench_bundle(name: str, work: Path, concurrency: list[int], settings: dict[str, Any]) -> dict[str, Any]:
    bundle, what = resolve_bundle(name, work)
    manifest = manifest_of(bundle)
    png = sample_png(manifest)
    load = {"duration": settings["duration"], "requests": settings["requests"]}
    print(f"serve bench: {name} ({what})", flush=True)
    runtime = RawOnnxRuntime(bundle)
    raw = runtime.sweep(settings["raw_seconds"])
    print(f"  raw ONNX Runtime: {raw['best_images_per_s']} images/s at batch {raw['best_batch']}", flush=True)
    raw_beside = partial(runtime.best_of, raw["leading_batches"], settings["raw_seconds"])
    modes = {}
    batch = settings["max_batch_size"]
    plan = [("dynamic", batch, 1, False, True, 1), ("batch1", 1, 1, False, True, 1)]
    if settings["burst"] > 1:
        plan.append((f"dynamic x{settings['burst']}", batch, settings["burst"], False, True, 1))
    if settings["spinning"]:
        plan.append(("dynamic spin", batch, 1, True, True, 1))
    if settings["no_keep_alive"]:
        plan.append(("dynamic close", batch, 1, False, False, 1))
    if settings["workers"] > 1:
        plan.append((f"dynamic {settings['workers']} workers", batch, 1, False, True, settings["workers"]))
        if settings["no_keep_alive"]:
            plan.append(
                (f"dynamic {settings['workers']} workers close", batch, 1, False, False, settings["workers"])
            )
    for mode, size, images, spin, keep_alive, workers in plan:
        modes[mode] = service_mode(
            bundle,
            png,
            size,
            settings["max_wait_ms"],
            concurrency,
            images,
            spin,
            raw_beside,
            keep_alive,
            workers,
            **load,
        )
        for p in modes[mode]["points"]:
            p["ratio_vs_raw"] = round(p["images_per_s"] / p["raw_images_per_s"], 3)
            print(f"  {mode} c={p['concurrency']}: {p['images_per_s']} images/s, p50 {p['p50_ms']} ms, "
                  f"ratio {p['ratio_vs_raw']} (raw beside {p['raw_images_per_s']})", flush=True)  # fmt: skip
    pre = manifest["preprocessing"]
    return {
        "name": name,
        "what": what,
        "architecture": manifest["architecture"],
        "input": f"{pre['channels']}×{pre['size']}×{pre['size']}",
        "png_bytes": len(png),
        "raw": raw,
        "service": modes,
    }


def run(
    names: list[str],
    work: Path,
    results: Path,
    *,
    concurrency: list[int],
    duration: float,
    requests: int,
    max_batch_size: int = 16,
    max_wait_ms: float = 0.0,
    raw_seconds: float = 1.5,
    burst: int = 16,
    spinning: bool = False,
    no_keep_alive: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    settings = dict(
        duration=duration, requests=requests, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
        raw_seconds=raw_seconds, burst=burst, spinning=spinning, no_keep_alive=no_keep_alive,
        workers=workers,
    )  # fmt: skip
    report = {
        "machine": machine(),
        "commit": git_commit(REPO),
        "gpu": "not measured (no GPU on this machine)",
        "settings": settings,
        "bundles": [bench_bundle(n, work, concurrency, settings) for n in names],
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "serve.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, results / "serve.md")
    return report


__all__ = ["LoadResult", "run"]
