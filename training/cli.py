"""Subcommands of the offline package: ``mnemo train``, ``evaluate``, ``export``, ``data synth``, ``demo``.

Only argparse lives here (nothing heavy is imported until a command runs), so ``mnemo --help`` is instant.
"""

from __future__ import annotations

import argparse

CONFIG_HELP = (
    "a run config file (YAML or TOML; see docs/training.md). Without one, `mnemo train --data DIR` trains "
    "the default recipe 'restore' (training/recipes/restore.yaml); --model NAME alone trains that model "
    "with its papers' defaults (Adam 1e-3, batch 256, early stopping with patience 10)."
)
SET_HELP = (
    "override one config value, e.g. --set optim.lr=1e-4 --set model_config.memory_size=8 "
    "(repeatable; values are read as YAML)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    _train(subparsers)
    _evaluate(subparsers)
    _export(subparsers)
    _data(subparsers)
    _demo(subparsers)


def _train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on good images",
        description="Train a model on normal (good) images, calibrate its threshold on held-out good images, "
        "evaluate it on the labelled test split when there is one, and write everything to the run "
        "directory: config.yaml, best.pt/last.pt checkpoints, history.json, calibration.json, report.json, "
        "plots/.",
    )
    p.add_argument("config", nargs="?", help=CONFIG_HELP)
    p.add_argument(
        "--recipe",
        help=f"a shipped run config ({', '.join(_recipes())}); without a config file and without --model "
        "the default recipe, 'restore', trains (the best defect finder measured on real images)",
    )
    p.add_argument(
        "--model",
        help="model name (see `mnemo models`); overrides the config's `model`. Alone (no config, no "
        "--recipe) it trains that model with its papers' defaults",
    )
    p.add_argument("--data", help="dataset directory; overrides data.path")
    p.add_argument("--out", help="run directory; overrides out_dir (default runs/<model>)")
    p.add_argument("--epochs", type=int, help="maximum epochs; overrides optim.max_epochs")
    p.add_argument(
        "--max-minutes",
        type=float,
        help="time budget of the training loop (optim.max_minutes): training stops after the step that "
        "reaches it and the run finishes as usual (best weights, calibration, evaluation, report, plots). "
        "The first Ctrl-C does the same; a second aborts",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        help="cap on optimizer steps over the whole run (optim.max_steps; 0 = none): stops like the time "
        "budget does, and makes capped runs of different protocols comparable",
    )
    p.add_argument("--device", help="auto (default: CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0 = every core this process may use; give 1 to each of several "
        "runs side by side: more threads than free cores only spin)",
    )
    p.add_argument("--seed", type=int, help="random seed for weights, shuffling and training randomness")
    p.add_argument(
        "--tiled",
        action="store_true",
        help="high-resolution images (data.tiled): train on tiles of the model's image size cut from the "
        "images at --tile-scale, and score every tile of a frame (the worst tile is its score, the "
        "heatmap is stitched); the bundle then scores uploads the same way. Images must hold one tile",
    )
    p.add_argument(
        "--tile-overlap",
        type=int,
        help="pixels neighbouring tiles share, blended in the heatmap (data.tile_overlap, default 16; "
        "implies --tiled)",
    )
    p.add_argument(
        "--tile-scale",
        type=float,
        help="working resolution / the images' own, in (0, 1] (data.tile_scale, default 1: every camera "
        "pixel; 0.5 halves each side first, a quarter of the tiles; implies --tiled)",
    )
    p.add_argument(
        "--roi",
        metavar="MASK.png",
        help="region of interest (data.roi): a mask of the camera frame, white where parts matter. Scores "
        "become the heatmap's peak inside it, calibration and pixel metrics count only the pixels inside, "
        "and the bundle carries the mask (checksummed), so the service judges the same way",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.set_defaults(func=lambda args: _run("train", args))


def _recipes() -> list[str]:
    from mnemo.training.config import list_recipes  # yaml only: keeps `mnemo --help` instant

    return list_recipes()


def _evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a labelled test set and write metrics and plots",
        description="Score the test split of a run's dataset (or of --data) with a trained run and write "
        "report.json (AUROC, AUPRC, best F1; pixel AUROC and PRO where masks exist) and PNG plots.",
    )
    p.add_argument("run", help="a run directory written by `mnemo train`")
    p.add_argument("--data", help="evaluate on this dataset directory instead of the run's")
    p.add_argument("--out", help="where to write the report (default: <run>/eval)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=lambda args: _run("evaluate", args))


def _export(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a deployable model bundle (ONNX + TorchScript + manifest)",
        description="Export a trained run to a bundle directory the service loads: model.onnx (dynamic "
        "batch), model.ts (TorchScript) and manifest.json (architecture, preprocessing, threshold, "
        "normal-score quantiles, metrics, library versions, sha256 of each file). The export verifies "
        "itself against "
        "PyTorch and fails if ONNX Runtime or TorchScript differ by more than --atol.",
    )
    p.add_argument(
        "run",
        help="a run directory written by `mnemo train`, or a bundle to export again with this Mnemo "
        "(weights from its model.ts, calibration kept: e.g. to add reconstruction.onnx to an older bundle)",
    )
    p.add_argument("--out", required=True, help="bundle directory to write (replaced if it exists)")
    p.add_argument("--name", help="model name clients use (default: the run's model name)")
    p.add_argument("--version", default=None, help="bundle version string (default: a UTC timestamp)")
    p.add_argument(
        "--threshold",
        default="false_alarm_rate",
        help="the verdict threshold to ship: false_alarm_rate (default: calibrated on held-out good images "
        "for the run's false_alarm_rate), best_f1 (needs a labelled test split), or a number",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="verification tolerance: outputs may differ from PyTorch by this plus 1e-3 × their largest "
        "|value| (default 1e-4)",
    )
    p.add_argument(
        "--triton",
        metavar="REPO",
        help="also add the bundle to this Triton model repository (config.pbtxt with dynamic batching, "
        "the ONNX graph, mnemo.json with preprocessing and calibration: decoding, verdict and p-values "
        "are then the client's job; training/triton.py)",
    )
    p.set_defaults(func=lambda args: _run("export", args))


def _data(subparsers) -> None:
    p = subparsers.add_parser("data", help="dataset tools", description="Dataset tools.")
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    s = sub.add_parser(
        "synth",
        help="generate the synthetic-defect texture dataset (MVTec AD layout)",
        description="Generate good images and defects with exact pixel masks (scratches, holes, stains, "
        "cut-paste patches, Perlin blotches) on scikit-image's real textures, in the MVTec AD folder layout.",
    )
    s.add_argument("out", help="output directory")
    s.add_argument(
        "--texture", default="brick", choices=["brick", "grass", "gravel"], help="background texture"
    )
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--train", type=int, default=200, help="good training images (default 200)")
    s.add_argument("--test-good", type=int, default=40, help="good test images (default 40)")
    s.add_argument("--test-defect", type=int, default=10, help="test images per defect type (default 10)")
    s.add_argument("--rgb", action="store_true", help="tinted RGB images instead of grayscale")
    s.add_argument(
        "--defect-size",
        type=int,
        help="high-resolution frames: the texture at its own scale (mirrored to fill --size) and each "
        "defect drawn in a random window of this many pixels (e.g. --size 2048 --defect-size 96: defects "
        "of a few hundred pixels, the tiling benchmark's set)",
    )
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=lambda args: _run("synth", args))


def _demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="build the default bundle end to end (synthetic data → train → evaluate → export)",
        description="Generate the synthetic-defect brick textures, train the default model (a CPU-sized "
        "DAAD) on them, evaluate it and export the bundle. `make demo-bundle` runs this to rebuild the "
        "bundle that ships in bundles/brick.",
    )
    p.add_argument(
        "--out", default="runs/demo", help="working directory for data and run (default runs/demo)"
    )
    p.add_argument("--bundle", default=None, help="bundle directory to write (default <out>/bundle)")
    p.add_argument("--name", default="brick", help="model name clients use (default brick)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed for data and training (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=lambda args: _run("demo", args))


def _run(command: str, args: argparse.Namespace) -> int:
    from mnemo.training import commands  # heavy imports (torch) only once a command runs

    return getattr(commands, f"cmd_{command}")(args)
