"""What the offline subcommands do with their parsed arguments; ``training/cli.py`` declares them.

Each handler turns flags into a call of the run API (``training.run``) and prints one line for people.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnemo.bundle import MANIFEST_FILE, Manifest
from mnemo.training import config as run_config
from mnemo.training.run import REPORT_FILE, evaluate_run, export_from_bundle, export_run, train_run
from mnemo.training.trainer import set_threads


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    flags = {
        "model": args.model,
        "data.path": args.data,
        "out_dir": args.out,
        "optim.max_epochs": args.epochs,
        "optim.max_minutes": args.max_minutes,
        "optim.max_steps": args.max_steps,
        "device": args.device,
        "seed": args.seed,
        "data.tiled": True
        if args.tile_overlap is not None or args.tile_scale is not None or args.tiled
        else None,
        "data.tile_overlap": args.tile_overlap,
        "data.tile_scale": args.tile_scale,
        "data.roi": args.roi,
    }
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    cfg = run_config.load(train_config_path(args.config, args.recipe, args.model), overrides)
    set_threads(args.threads)
    train_run(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


def train_config_path(config: str | None, recipe: str | None, model: str | None) -> Path | None:
    """A config file, else the named recipe, else the default recipe unless ``--model`` picks a model
    (which then trains with its own, paper-faithful defaults)."""
    if config and recipe:
        raise ValueError("give a config file or --recipe, not both")
    if config:
        return Path(config)
    if recipe or not model:
        return run_config.recipe_path(recipe or run_config.DEFAULT_RECIPE)
    return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    out = evaluate_run(
        Path(args.run),
        data=args.data,
        out=Path(args.out) if args.out else None,
        device=args.device,
        progress=not args.no_progress,
    )
    print(f"report: {out / REPORT_FILE}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    source = Path(args.run)
    if (source / MANIFEST_FILE).is_file():  # a bundle: export it again with this Mnemo's exporter
        if args.threshold != "false_alarm_rate":
            raise ValueError(
                "--threshold applies to runs; a bundle keeps its calibration (mnemo recalibrate)"
            )
        manifest = export_from_bundle(source, args.out, name=args.name, version=args.version, atol=args.atol)
    else:
        manifest = export_run(
            source, args.out, name=args.name, version=args.version, threshold=args.threshold, atol=args.atol
        )
    print_exported(manifest, args.out)
    if args.triton:
        from mnemo.training.triton import write_triton_repository

        print(f"Triton model repository: {write_triton_repository(Path(args.out), Path(args.triton))}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from mnemo.training.synthetic import generate

    summary = generate(
        args.out, texture=args.texture, size=args.size, n_train=args.train, n_test_good=args.test_good,
        n_test_defect=args.test_defect, seed=args.seed, rgb=args.rgb, defect_size=args.defect_size,
    )  # fmt: skip
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mnemo.training import demo
    from mnemo.training.synthetic import generate

    out = Path(args.out)
    data = out / "data"
    if not (data / "dataset.json").is_file():
        generate(
            data, texture=demo.DEMO_TEXTURE, size=demo.DEMO_IMAGE_SIZE, n_train=demo.DEMO_TRAIN_IMAGES,
            seed=args.seed,
        )  # fmt: skip
    cfg = demo.demo_run_config(data, out / "run", epochs=args.epochs, seed=args.seed)
    run_dir = train_run(cfg, progress=not args.no_progress)
    bundle = args.bundle or str(out / "bundle")
    print_exported(export_run(run_dir, bundle, name=args.name), bundle)
    return 0


def print_exported(manifest: Manifest, out: str | Path) -> None:
    diffs = manifest.training["export_max_abs_diff"]
    print(f"exported {manifest.name} {manifest.version} → {out}  (max |diff| vs PyTorch: {diffs})")
