"""The serving benchmark as markdown: one table per bundle, raw ONNX Runtime beside both service modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_markdown(report: dict[str, Any], path: Path) -> None:
    path.write_text(render(report))


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# Serving benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (load generator on the same cores); commit "
        f"`{report['commit']}`. GPU: {report['gpu']}. One PNG per request at the model's input size "
        f"(mode `dynamic x{s.get('burst', 1)}`: that many PNGs per multipart request"
        + ("; mode `dynamic spin`: dynamic batching with `MNEMO_ORT_SPINNING=1`" if s.get("spinning") else "")
        + ("; mode `dynamic close`: a fresh connection per request" if s.get("no_keep_alive") else "")
        + (
            f"; mode `dynamic {s['workers']} workers`: `mnemo serve --workers {s['workers']}`, CPU and "
            "memory of every process added up"
            if s.get("workers", 1) > 1
            else ""
        )
        + "); "
        f"{s['duration']} s or {s['requests']} requests per point; dynamic batching = max batch "
        f"{s['max_batch_size']}, max wait {s['max_wait_ms']} ms. Ratio = service images/s ÷ raw ONNX Runtime "
        "images/s (in-process, pre-normalised arrays, the better of its best two batch sizes) re-timed "
        "right before and after the point (raw beside = their mean), so the two are measured side by side. "
        "Server p50 = the service's own timings (decode + queue + inference); server CPU = the server "
        "process's CPU time (all threads) per image; mean batch = images per inference call (its metrics); "
        "client CPU = cores the load generator itself used.",
        "",
    ]
    for bundle in report["bundles"]:
        lines += _bundle(bundle)
    return "\n".join(lines) + "\n"


def _bundle(b: dict[str, Any]) -> list[str]:
    raw = b["raw"]
    single = raw["single_image_ms"]
    lines = [
        f"## {b['name']}: {b['architecture']} {b['input']}",
        "",
        f"{b['what']}. Raw ONNX Runtime: **{raw['best_images_per_s']} images/s** at batch "
        f"{raw['best_batch']} (by batch: {raw['images_per_s_by_batch']}); single image p50 "
        f"{single.get('p50')} ms, p99 {single.get('p99')} ms.",
        "",
        "| mode | cold start s | RSS MB (loaded / after run) |",
        "| --- | --- | --- |",
    ]
    for mode, r in b["service"].items():
        mem0, mem1 = r["memory_after_load_mb"], r["memory_after_run_mb"]
        lines.append(f"| {mode} | {r['cold_start_s']} | {mem0['rss_mb']} / {mem1['rss_mb']} |")
    lines += [
        "",
        "| mode | concurrency | images/s | p50 ms | p95 ms | p99 ms | server p50 ms | server CPU ms / image "
        "| mean batch | client CPU | errors | raw beside | service ÷ raw |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, r in b["service"].items():
        for p in r["points"]:
            lines.append(
                f"| {mode} | {p['concurrency']} | {p['images_per_s']} | {p['p50_ms']} | {p['p95_ms']} | "
                f"{p['p99_ms']} | {p['server_p50_ms']} | {p.get('server_cpu_ms_per_image')} | "
                f"{p.get('mean_batch_size')} | {p['client_cpu_cores']} | {p['errors']} | "
                f"{p['raw_images_per_s']} | {p['ratio_vs_raw']} |"
            )
    return [*lines, ""]
