"""``mnemo bench accuracy`` / ``train`` / ``serve`` / ``decode``: argparse only; the work is imported when
it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS = Path("benchmarks/results")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmarks: the papers' accuracy tables, training and serving speed, decoding, failover, "
        "high-resolution frames",
        description="Benchmarks. `accuracy` reproduces the papers' ROCO / one-class tables with the real "
        "training pipeline; `train` measures the training loop's steps/s against a bare loop; "
        "`serve` load-tests a real `mnemo serve` against raw ONNX Runtime; `decode` "
        "measures what decoding one large image costs; `highres` compares tiling with resizing on "
        "2048 px frames; `failover` kills one of two replicas under load.",
    )
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)
    _accuracy(sub)
    _train(sub)
    _serve(sub)
    _decode(sub)
    _failover(sub)
    _highres(sub)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def _names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _protocols(text: str) -> list[str]:
    from mnemo.benchmarks.accuracy_plan import PROTOCOLS

    names = _names(text)
    if not names or any(t not in PROTOCOLS for t in names):
        raise argparse.ArgumentTypeError(f"unknown protocol {text!r}: one or more of {', '.join(PROTOCOLS)}")
    return names


def _accuracy(sub) -> None:
    p = sub.add_parser(
        "accuracy",
        help="train and evaluate every (dataset, protocol, model, class, seed) cell; resumable",
        description="Train and evaluate each cell with `mnemo train`'s pipeline (Adam 1e-3, batch 256, early "
        "stopping with patience 10 on a 10 % validation split, up to 100 epochs), append its AUROC, "
        "AUPRC and best F1 to the results JSON at once, and rewrite the markdown table (ours beside "
        "the papers'). Cells already in the JSON are skipped, so an interrupted run resumes (one "
        "whose record was trained with another model configuration than the plan now gives it runs "
        "again); a cell stopped mid-training continues from its last epoch's checkpoint in --work "
        "(not one under a time budget). Seeds run one after the other over every selected cell. "
        "Models: ae, memae, memorizer, rftm (ROCO, every IDX dataset, and one-class on MNIST); daad, "
        "daad_plus, anomem (one-class, MNIST only); all eight on `textures`, our synthetic-defect "
        "benchmark (brick, grass, gravel as classes 0-2; generated on the spot; image AUROC, pixel "
        "AUROC and PRO; 64 px, Adam 1e-3, batch 16, at most 20 epochs).",
    )
    p.add_argument(
        "--data",
        default="../shared/data",
        help="folder with one IDX subfolder per dataset "
        "(mnist/, fashion-mnist/, kmnist/ when you have it) (default ../shared/data)",
    )
    p.add_argument(
        "--datasets",
        type=_names,
        default=["mnist", "fashion-mnist", "textures"],
        help="comma-separated: mnist, fashion-mnist, kmnist (IDX, read from --data), textures "
        "(generated), elpv-mono (real defects, an MVTec-layout folder under --data; skipped with a message "
        "when absent; every model with its shipped recipe, 15 minutes of training each) "
        "(default mnist,fashion-mnist,textures)",
    )
    p.add_argument(
        "--models",
        type=_names,
        default=["ae", "memae", "memorizer", "rftm", "daad", "daad_plus", "anomem", "restore"],
        help="comma-separated model names (default all; each runs where its paper applies it, every one "
        "on textures and on real-defect folders, each with its shipped recipe there); ae, memae, memorizer "
        "or rftm with +bank (memorizer+bank) trains that model wherever it runs and scores it with a latent "
        "bank of the training images",
    )
    p.add_argument(
        "--protocols",
        type=_protocols,
        default=None,
        help="comma-separated: roco, one_class, synthetic, real (default every protocol each model runs "
        "on each dataset)",
    )
    p.add_argument(
        "--classes",
        type=_ints,
        default=list(range(10)),
        help="comma-separated class indices: the anomalous class (ROCO), the normal one "
        "(one-class), or the texture (0 brick, 1 grass, 2 gravel) (default 0-9)",
    )
    p.add_argument(
        "--seeds",
        type=_ints,
        default=[1997, 2015, 2022],
        help="comma-separated seeds (default the papers' 1997,2015,2022)",
    )
    p.add_argument(
        "--max-epochs",
        type=int,
        default=100,
        help="epoch cap (default 100 = the papers'; textures never train more than 20; real-defect "
        "cells keep their recipe's caps unless this is lower); a lower cap is recorded and flagged in the "
        "table as not the full protocol",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=10,
        help="early-stopping patience in epochs (default 10; real-defect cells keep their recipe's)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core box more threads than free cores "
        "made training ~10x slower; 0 keeps torch's default)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells trained at once, each in its own process with --threads threads, its output in "
        "--work/<cell>.log; this process writes the results as each finishes (default 1: one after the "
        "other; on 2 cores, 2 at 1 thread each; on a GPU, several share it: a small model leaves most of "
        "it idle)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument(
        "--results",
        default=str(RESULTS / "accuracy.json"),
        help="results JSON, read to skip finished cells and appended to (default "
        "benchmarks/results/accuracy.json); the markdown goes next to it (.md)",
    )
    p.add_argument("--work", default="runs/bench", help="scratch run directories (default runs/bench)")
    p.add_argument(
        "--keep-runs", action="store_true", help="keep each cell's run directory (checkpoints, plots)"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite the markdown from the results JSON; train nothing",
    )
    p.add_argument(
        "--merge",
        type=lambda text: [Path(name) for name in _names(text)],
        default=[],
        metavar="JSON[,JSON...]",
        help="fold other runs' results files into --results (their record wins where a cell is in both), "
        "rewrite the markdown, train nothing: for runs started apart, each with its own --results file "
        "(two writers on one file lose cells; --jobs trains side by side with one writer)",
    )
    p.set_defaults(func=cmd_accuracy)


def _serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="load-test `mnemo serve` against raw ONNX Runtime on the same bundles",
        description="For each bundle: raw ONNX Runtime throughput in-process (best batch size, and the "
        "single-image latency); then a real `mnemo serve` subprocess on 127.0.0.1 (random port), once "
        "with dynamic batching, once with --max-batch-size 1 (one PNG per request each), once with dynamic "
        "batching and --burst PNGs per request, with --spinning once more with MNEMO_ORT_SPINNING=1, and "
        "with --no-keep-alive once more on a fresh connection per request; "
        "each loaded by an asyncio closed-loop generator at each concurrency (bounded by --requests and "
        "--duration). Reports images/s, p50/p95/p99 latency, service ÷ raw (raw re-timed at the sweep's "
        "best two batch sizes right before and after each point, so the two are side by side), server CPU "
        "per image, mean batch size, cold start to ready and the server's resident memory. Writes "
        "serve.json and serve.md. Bundles it exports itself are untrained: speed does not depend on the "
        "weights.",
    )
    p.add_argument(
        "--bundles",
        type=_names,
        default=["brick", "mnist", "daad256"],
        help="comma-separated: brick (the shipped bundles/brick, 64 px gray DAAD), mnist (an "
        "untrained 28 px memorizer N=8, exported here), daad256 (an untrained default-config "
        "256 px RGB DAAD, exported here), or a path to any bundle (default all three)",
    )
    p.add_argument(
        "--concurrency",
        type=_ints,
        default=[1, 8, 32, 64],
        help="comma-separated client concurrencies (default 1,8,32,64)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=4.0,
        help="seconds of load per (mode, concurrency) point, after a short warm-up (default 4)",
    )
    p.add_argument("--requests", type=int, default=4000, help="most requests per point (default 4000)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="the dynamic-batching server's --max-batch-size (default 16, the service default)",
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="its --max-wait-ms (default 0, the service default)"
    )
    p.add_argument(
        "--raw-seconds",
        type=float,
        default=1.5,
        help="seconds of raw ONNX Runtime timing per batch size (default 1.5)",
    )
    p.add_argument(
        "--burst",
        type=int,
        default=16,
        help="images per request in the extra 'dynamic xN' mode (one multipart upload of N PNGs; at most "
        "the service's MNEMO_MAX_FILES, 16); 1 or 0 skips that mode (default 16)",
    )
    p.add_argument(
        "--spinning",
        action="store_true",
        help="add a 'dynamic spin' mode: dynamic batching with MNEMO_ORT_SPINNING=1 (idle ONNX Runtime "
        "threads spin, as the raw measurement's do)",
    )
    p.add_argument(
        "--no-keep-alive",
        action="store_true",
        help="add a 'dynamic close' mode: dynamic batching, every request on a fresh TCP connection closed "
        "after its answer (Connection: close), as a camera that connects per frame sends them",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="add a 'dynamic N workers' mode: dynamic batching under `mnemo serve --workers N` (N service "
        "processes on the port; memory and CPU are the processes' sum); 1 skips it (default 1)",
    )
    p.add_argument(
        "--work", default="runs/bench-serve", help="where exported bundles go (default runs/bench-serve)"
    )
    p.add_argument("--results", default=str(RESULTS), help="output folder for serve.json / serve.md")
    p.set_defaults(func=cmd_serve)


def cmd_accuracy(args: argparse.Namespace) -> int:
    from mnemo.benchmarks import accuracy, accuracy_plan
    from mnemo.benchmarks.accuracy_report import write_markdown

    results = Path(args.results)
    if args.merge:
        merged = accuracy.merge_results(results, args.merge)
        write_markdown(merged, results.with_suffix(".md"))
        print(f"merged {len(args.merge)} file(s) into {results}: {len(merged['records'])} records")
        return 0
    if args.report_only:
        write_markdown(accuracy.load_results(results), results.with_suffix(".md"))
        print(f"wrote {results.with_suffix('.md')}")
        return 0
    if args.threads:
        from mnemo.training.trainer import set_threads

        set_threads(args.threads)
    datasets = [d for d in args.datasets if _dataset_present(d, Path(args.data))]
    cells = accuracy_plan.plan(
        datasets, args.models, args.classes, args.seeds, args.max_epochs, protocols=args.protocols
    )
    accuracy.run(
        cells,
        Path(args.data),
        results,
        Path(args.work),
        patience=args.patience,
        device=args.device,
        keep_runs=args.keep_runs,
        markdown_path=results.with_suffix(".md"),
        jobs=args.jobs,
        threads=args.threads,
    )
    print(f"results: {results} and {results.with_suffix('.md')}")
    return 0


def _dataset_present(name: str, data: Path) -> bool:
    """Real-defect folders are optional (they cannot ship with the repo): skip a missing one, saying so."""
    from mnemo.benchmarks.accuracy_plan import REAL_DATASETS

    if name in REAL_DATASETS and not (data / REAL_DATASETS[name]).is_dir():
        print(f"accuracy: skipping {name}: {data / REAL_DATASETS[name]} not found")
        return False
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    from mnemo.benchmarks import serve

    report = serve.run(
        args.bundles,
        Path(args.work),
        Path(args.results),
        concurrency=args.concurrency,
        duration=args.duration,
        requests=args.requests,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        raw_seconds=args.raw_seconds,
        burst=args.burst,
        spinning=args.spinning,
        no_keep_alive=args.no_keep_alive,
        workers=args.workers,
    )
    print(f"results: {Path(args.results) / 'serve.json'} and serve.md ({len(report['bundles'])} bundles)")
    return 0


def _train(sub) -> None:
    from_cases = "ae, memae, memorizer, rftm (MNIST ROCO), daad (one-class MNIST), anomem, restore (textures)"
    p = sub.add_parser(
        "train",
        help="optimizer steps/s of mnemo train's loop against a bare PyTorch loop, with a profile",
        description="For each architecture at its paper configuration, train the same model side by side "
        "with a bare loop (training_step on batches already in memory: the machine's limit), mnemo train's "
        "loop (train_epoch over the in-memory batches) and the per-item DataLoader it used before; report "
        "the median steps/s of each, their ratios, and where the loop's time goes. Writes train-speed.json "
        f"and train-speed.md (benchmarks/train_speed.py). Models: {from_cases}.",
    )
    p.add_argument("--models", type=_names, default=None, help=f"comma-separated (default all: {from_cases})")
    p.add_argument(
        "--data", default="../shared/data", help="folder holding mnist/ as IDX (default ../shared/data)"
    )
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per loop and round (default 40)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median is kept (default 3)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0 = every usable core, as mnemo train)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--results", default=str(RESULTS), help="output folder (default benchmarks/results)")
    p.add_argument(
        "--work", default="runs/bench-train", help="where generated textures go (default runs/bench-train)"
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from mnemo.benchmarks import train_speed
    from mnemo.training.trainer import set_threads

    set_threads(args.threads)
    models = args.models or list(train_speed.CASES)
    train_speed.run(
        models, Path(args.data), Path(args.work), Path(args.results), args.steps, args.rounds, args.device
    )
    print(f"results: {Path(args.results) / 'train-speed.json'} and train-speed.md")
    return 0


def _failover(sub) -> None:
    p = sub.add_parser(
        "failover",
        help="two replicas behind HAProxy, one killed under load: what the clients saw",
        description="Start two `mnemo serve` replicas of --bundle and HAProxy in front of them with the "
        "reference config (docker/haproxy/haproxy.cfg: least connections, health checks on /readyz, "
        "retries of refused, unanswered and 503 requests), load it with closed-loop clients, kill replica "
        "1 with SIGKILL, and report requests sent, failed, retried by the balancer, and for how long after "
        "the kill requests needed a retry. Writes failover.json and failover.md. Needs haproxy.",
    )
    p.add_argument("--bundle", default="bundles/brick", help="the bundle both replicas serve")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of load (default 10)")
    p.add_argument("--kill-at", type=float, default=4.0, help="seconds into the load to kill (default 4)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--results", default=str(RESULTS), help="output folder (default benchmarks/results)")
    p.set_defaults(func=cmd_failover)


def cmd_failover(args: argparse.Namespace) -> int:
    import json

    from mnemo.benchmarks import failover
    from mnemo.benchmarks.serve import manifest_of, sample_png

    manifest = manifest_of(Path(args.bundle))
    image = sample_png(manifest)
    result = failover.run(
        Path(args.bundle), image, manifest["name"], args.seconds, args.kill_at, args.clients
    )
    failover.write(result, Path(args.results))
    print(json.dumps(result))
    return 0


def _decode(sub) -> None:
    p = sub.add_parser(
        "decode",
        help="decode time and peak memory per image, before and after issue 13, and a burst on a real server",
        description="Decode a 40 MP PNG, a 40 MP JPEG, the 126-byte PNG declaring 40 MP and a complete 40 MP "
        "PNG of zero rows to a 256 px model input, the old way (full size as floats) and the new way "
        "(decoded to the model's size), each in a fresh interpreter: median seconds and peak resident "
        "memory. Then bursts against a real `mnemo serve` (bundles/brick) with a small client probing. "
        "Writes decode.json and decode.md (benchmarks/decode.py).",
    )
    p.add_argument("--results", default=str(RESULTS), help="output folder (default benchmarks/results)")
    p.add_argument(
        "--work", default="runs/bench-decode", help="where the input files go (default runs/bench-decode)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="decodes per file and path; the median is kept (default 3)"
    )
    p.add_argument("--no-service", action="store_true", help="skip the bursts against a real server")
    p.set_defaults(func=cmd_decode)


def cmd_decode(args: argparse.Namespace) -> int:
    from mnemo.benchmarks import decode

    decode.run(Path(args.results), Path(args.work), repeats=args.repeats, service=not args.no_service)
    print(f"results: {Path(args.results) / 'decode.json'} and decode.md")
    return 0


def _highres(sub) -> None:
    from_setup = "2048 px frames, 96 px defect windows, restore at 64 px, tiles at scale 0.25"
    p = sub.add_parser(
        "highres",
        help="tiling against resizing on high-resolution frames with small synthetic defects",
        description="Generate 2048×2048 synthetic brick frames whose defects cover a few hundred pixels, "
        "train the default recipe twice under the same budget (tiled, and resized to the model's size), "
        "and report image AUROC, pixel AUROC and PRO (both at the tiling's working resolution) and the "
        "latency per frame through a real `mnemo serve`. Writes highres.json and highres.md "
        f"(benchmarks/highres.py). Defaults: {from_setup}.",
    )
    p.add_argument("--size", type=int, default=2048, help="frame side in pixels (default 2048)")
    p.add_argument("--defect-size", type=int, default=96, help="defect window in pixels (default 96)")
    p.add_argument("--train", type=int, default=60, help="good training frames (default 60)")
    p.add_argument("--test-good", type=int, default=20, help="good test frames (default 20)")
    p.add_argument("--test-defect", type=int, default=6, help="test frames per defect type (default 6)")
    p.add_argument("--tile", type=int, default=64, help="model input and tile size (default 64)")
    p.add_argument("--overlap", type=int, default=16, help="tile overlap (default 16)")
    p.add_argument("--scale", type=float, default=0.25, help="tiled working resolution (default 0.25)")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget of each arm (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0 = every usable core)")
    p.add_argument(
        "--work", default="runs/bench-highres", help="data, runs, bundles (default runs/bench-highres)"
    )
    p.add_argument("--results", default=str(RESULTS), help="output folder (default benchmarks/results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_highres)


def cmd_highres(args: argparse.Namespace) -> int:
    from mnemo.benchmarks import highres
    from mnemo.training.trainer import set_threads

    set_threads(args.threads)
    setup = highres.Setup(
        size=args.size, defect_size=args.defect_size, n_train=args.train, n_test_good=args.test_good,
        n_test_defect=args.test_defect, tile=args.tile, overlap=args.overlap, scale=args.scale,
        minutes=args.minutes,
    )  # fmt: skip
    highres.run(setup, Path(args.work), Path(args.results), progress=not args.no_progress)
    print(f"results: {Path(args.results) / 'highres.json'} and highres.md")
    return 0
