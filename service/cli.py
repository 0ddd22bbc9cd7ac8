"""``mnemo serve``: run the scoring service under uvicorn; ``mnemo recalibrate``: a bundle's calibration
on new good images.

Settings come from ``MNEMO_*`` environment variables (see ``service/settings.py``); a flag given here wins
over its variable. Only argparse is imported until the command runs, so ``mnemo --help`` stays instant.
"""

from __future__ import annotations

import argparse

# flag -> (settings field, type, help); each flag's variable MNEMO_<FIELD> is added to its help text.
FLAGS = {
    "--model-dir": ("model_dir", str, "directory of model bundles, or one bundle (default ./bundles)"),
    "--host": ("host", str, "interface to listen on; 0.0.0.0 for all (default 127.0.0.1)"),
    "--port": ("port", int, "TCP port (default 8000)"),
    "--workers": (
        "workers",
        int,
        "service processes sharing the port, each with its own models and inference lane (default 1)",
    ),
    "--grpc-port": (
        "grpc_port",
        int,
        "also serve the Open Inference Protocol over gRPC on this port; 0 = off (default 0; needs grpcio)",
    ),
    "--backend": ("backend", str, "auto (= onnxruntime), onnxruntime or torchscript (default auto)"),
    "--device": ("device", str, "auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default auto)"),
    "--max-batch-size": ("max_batch_size", int, "most images per inference call (default 16)"),
    "--max-wait-ms": (
        "max_wait_ms",
        float,
        "longest a queued image waits for batch mates; 0 = greedy (default 0)",
    ),
    "--max-queue": ("max_queue", int, "most images waiting per model before 503 (default 1024)"),
    "--max-queue-wait": (
        "max_queue_wait_s",
        float,
        "most seconds of work waiting ahead of a request (at the model's measured speed) before 503; 0 = off "
        "(default 2)",
    ),
    "--request-timeout": (
        "request_timeout_s",
        float,
        "seconds of decoding + queue + inference before 504 (default 10)",
    ),
    "--max-upload-bytes": ("max_upload_bytes", int, "largest request body before 413 (default 20 MiB)"),
    "--max-files": ("max_files", int, "most images in one request (default 16)"),
    "--max-request-pixels": (
        "max_request_pixels",
        int,
        "most pixels a request's images may declare together, refused before decoding (default 80000000)",
    ),
    "--header-timeout": (
        "header_timeout_s",
        float,
        "seconds a client has to send a request's headers, else 408 and close (default 10)",
    ),
    "--body-timeout": (
        "body_timeout_s",
        float,
        "longest silence in seconds while receiving a request body, else 408 and close (default 10)",
    ),
    "--shutdown-timeout": (
        "shutdown_timeout_s",
        float,
        "on SIGTERM/SIGINT, seconds running requests may take before they are cancelled (default 5)",
    ),
    "--ready-requires": (
        "ready_requires",
        str,
        "/readyz is 200 when 'all' bundles are served, or 'any' one (default all)",
    ),
    "--capture-dir": (
        "capture_dir",
        str,
        "save anomalous images (and MNEMO_CAPTURE_OK_FRACTION of ok ones) with their answer here, bounded "
        "by MNEMO_CAPTURE_MAX_MB, oldest deleted first (default: off)",
    ),
    "--log-level": ("log_level", str, "critical, error, warning, info or debug (default info)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP scoring service",
        description="Serve every model bundle in a directory over HTTP: POST /v1/models/NAME:score, "
        "GET /v1/models, /healthz, /readyz, /metrics, API docs at /docs, an upload page at /. Every setting "
        "is also read from an environment variable MNEMO_<NAME> (flags win); MNEMO_API_KEY turns on "
        "API-key auth (header MNEMO_API_KEY_HEADER, default X-API-Key), kept out of flags so it never shows "
        "in the process list. Other variables: MNEMO_RETRY_AFTER_S, MNEMO_MAX_IMAGE_PIXELS, "
        "MNEMO_HEATMAP_GRID_SIZE, MNEMO_INTRA_OP_THREADS, MNEMO_ORT_SPINNING, MNEMO_DECODE_CONCURRENCY, "
        "MNEMO_MAX_HEADER_BYTES (request line + headers, else 431; default 32768), "
        "MNEMO_KEEP_ALIVE_TIMEOUT_S (idle kept-alive connections; default 5), MNEMO_CAPTURE_OK_FRACTION, "
        "MNEMO_CAPTURE_MAX_MB, MNEMO_CAPTURE_QUEUE (review capture), MNEMO_WORKER_START_TIMEOUT_S (how long "
        "a worker of a rolling restart may take to load; default 120) (service/settings.py; the limits: "
        "docs/security.md). Score options per request: heatmap=, heatmap_scale=, regions=true, "
        "reconstruction=true, roi=x,y,w,h, threshold=. A bundle trained with `mnemo train --tiled` is "
        "scored tile by tile (its tiles count against --max-queue; the score is the worst tile's, heatmaps "
        "and regions come at its working resolution, in the upload's coordinates).",
    )
    for flag, (field, kind, text) in FLAGS.items():
        p.add_argument(flag, type=kind, default=None, help=f"{text} [env MNEMO_{field.upper()}]")
    p.set_defaults(func=run)
    _recalibrate(subparsers)


def _recalibrate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recalibrate",
        help="recompute a bundle's threshold and pixel level on new good images, without retraining",
        description="Score new good images (lighting changed, a new batch of material) with the bundle's own "
        "graph, recompute the verdict threshold for the false-alarm rate, the p-value distribution and the "
        "pixel level of regions and heatmap colours, and write the bundle again under a new version (model "
        "files untouched; the manifest replaced atomically). A running `mnemo serve` picks it up at its next "
        "reload (POST /v1/admin/reload). Prints how the threshold moved, as JSON. Needs no torch.",
    )
    p.add_argument("bundle", help="the bundle directory (manifest.json, model.onnx)")
    p.add_argument(
        "--data",
        required=True,
        help="good images: a folder of them, or an MVTec-layout folder (its train/good, or BTAD's train/ok, "
        "is read); a tiled bundle scores them tile by tile, as it serves, so they must share one size",
    )
    p.add_argument("--out", help="write the recalibrated bundle here instead of in place (must not exist)")
    p.add_argument(
        "--false-alarm-rate",
        type=float,
        help="target share of good images flagged anomalous (default: the bundle's own, else 0.01)",
    )
    p.add_argument(
        "--pixel-false-alarm-rate",
        type=float,
        help="target share of good pixels above the region level (default: the bundle's own, else 0.0001)",
    )
    p.add_argument(
        "--roi",
        help="a region-of-interest mask PNG of the camera frame (white = counts) to put in the bundle: the "
        "score becomes the heatmap's peak inside it, calibrated here on the pixels inside (default: keep "
        "the bundle's own ROI, if any)",
    )
    p.add_argument("--version", help="the new version string (default: a UTC timestamp)")
    p.add_argument("--backend", default="auto", help="auto (= onnxruntime), onnxruntime or torchscript")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_recalibrate)


def run_recalibrate(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from mnemo.cli import print_json
    from mnemo.service.recalibration import recalibrate

    report = recalibrate(
        Path(args.bundle), Path(args.data), out=Path(args.out) if args.out else None,
        false_alarm_rate=args.false_alarm_rate, pixel_false_alarm_rate=args.pixel_false_alarm_rate,
        roi=Path(args.roi) if args.roi else None,
        version=args.version, backend=args.backend, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    print_json(report)
    if report["warning"]:
        print(f"warning: {report['warning']}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError

    from mnemo.service.settings import Settings

    given = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in FLAGS.items()}
    given = {field: value for field, value in given.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:  # pydantic's own text echoes the values given, an API key among them
        from mnemo.service.errors import validation_problems

        raise ValueError(validation_problems(exc.errors(include_input=False), ("settings",))) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.workers > 1:  # the supervisor imports no app: each worker builds its own
        from mnemo.service.workers import serve_workers

        return serve_workers(settings, given)
    import uvicorn

    from mnemo.service.app import create_app
    from mnemo.service.server import server_config

    uvicorn.Server(server_config(settings, create_app(settings))).run()
    return 0
