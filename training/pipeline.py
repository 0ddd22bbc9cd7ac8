"""What the offline commands do: train → calibrate → evaluate → export, on a run directory.

A run directory holds everything needed to evaluate or export later without the training data:

    config.yaml        the run's full config (defaults filled in)
    best.pt, last.pt   training checkpoints (resume with --resume)
    model.pt           the final weights (best epoch, plus DAAD+'s fitted score scaling)
    samples.pt         a few held-out good images, for the export's self-check
    history.json       per-epoch losses
    calibration.json   threshold, how it was chosen, normal-score quantiles (mnemo.calibration)
    report.json        data summary, metrics, threshold behaviour on the test split
    plots/             ROC, PR, score histogram, example grid
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mnemo import models
from mnemo.calibration import Calibration
from mnemo.imaging import Preprocessing
from mnemo.training import config as run_config
from mnemo.training import datasets, plots
from mnemo.training.calibration import calibrate
from mnemo.training.evaluate import ScoredSet, compute_metrics, score_dataset
from mnemo.training.export import export_bundle
from mnemo.training.trainer import fit, images_of, pick_device, seed_everything

EXPORT_SAMPLES = 8


# ------------------------------------------------------------------------------------------ building


def load_splits(data: run_config.DataConfig, prep: Preprocessing) -> datasets.Splits:
    if not data.path:
        raise ValueError("no dataset: set data.path in the config or pass --data DIR")
    if data.kind == "idx":
        return datasets.idx_splits(
            data.path, data.protocol, data.target_class, prep,
            val_fraction=data.val_fraction, split_seed=data.split_seed,
        )  # fmt: skip
    if data.kind == "folder":
        return datasets.folder_splits(
            data.path, prep, val_fraction=data.val_fraction, split_seed=data.split_seed, flips=data.flips
        )
    raise ValueError(f"data.kind must be 'folder' or 'idx', got {data.kind!r}")


def loader(dataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator
    )


def preprocessing_of(model: torch.nn.Module, resize: str) -> Preprocessing:
    return Preprocessing.from_model_config(model.config, resize=resize)


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The final model of a run (``model.pt``)."""
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished `mnemo train` run?")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = models.create(ckpt["model_name"], **ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def save_model(model: torch.nn.Module, path: Path) -> None:
    torch.save(
        {
            "model_name": model.model_name,
            "model_config": dataclasses.asdict(model.config),
            "model": model.state_dict(),
        },
        path,
    )


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float))


# -------------------------------------------------------------------------------------------- train


def train_run(cfg: run_config.RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train, let the model finish on its training images (``after_fit``), calibrate, evaluate; returns
    the run directory."""
    out = cfg.output_path
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model = models.create(cfg.model, **cfg.model_config)
    prep = preprocessing_of(model, cfg.data.resize)
    splits = load_splits(cfg.data, prep)
    optim = run_config.resolve_optim(cfg.optim, model.config)
    cfg = dataclasses.replace(cfg, optim=optim)
    run_config.save(cfg, out / "config.yaml")
    workers = cfg.data.num_workers
    train_loader = loader(splits.train, optim.batch_size, workers, shuffle=True, seed=cfg.seed)
    val_loader = loader(splits.val, optim.batch_size, workers)
    print(f"training {cfg.model} on {device} → {out}  ({json.dumps(splits.summary, default=str)[:200]})")
    state = fit(model, train_loader, val_loader, optim, device, out, cfg.to_dict(), resume, progress)
    write_json(out / "history.json", state.history)

    model.after_fit(images_of(b) for b in loader(splits.train, optim.batch_size, workers))
    save_model(model, out / "model.pt")
    torch.save(next(iter(loader(splits.val, EXPORT_SAMPLES, 0)))["image"], out / "samples.pt")

    val = score_dataset(model, val_loader, device, progress)
    test = (
        score_dataset(model, loader(splits.test, optim.batch_size, workers), device, progress)
        if splits.test
        else None
    )
    calibration = calibrate(
        val.scores,
        false_alarm_rate=cfg.false_alarm_rate,
        scores=None if test is None else test.scores,
        labels=None if test is None else test.labels,
    )
    write_json(out / "calibration.json", calibration.to_dict())
    report = {
        "model": cfg.model,
        "data": splits.summary,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val,
        "device": str(device),
    }
    if test is not None:
        report["test"] = evaluation_report(test, calibration)
        write_plots(model, splits.test, test, calibration, out / "plots", device)
    write_json(out / "report.json", report)
    print(summary_line(report, calibration))
    return out


def evaluation_report(scored: ScoredSet, calibration: Calibration) -> dict[str, Any]:
    """The papers' metrics plus how the calibrated threshold behaves on this labelled set."""
    report = compute_metrics(scored)
    flagged = scored.scores > calibration.threshold
    normal, anomalous = scored.labels == 0, scored.labels == 1
    report["at_threshold"] = {
        "threshold": calibration.threshold,
        "false_alarm_rate": float(flagged[normal].mean()) if normal.any() else None,
        "detection_rate": float(flagged[anomalous].mean()) if anomalous.any() else None,
    }
    return report


def summary_line(report: dict[str, Any], calibration: Calibration) -> str:
    image = report.get("test", {}).get("image")
    metrics = (
        f"AUROC {image['auroc']:.4f}  AUPRC {image['auprc']:.4f}  F1 {image['f1']:.4f}"
        if image
        else "no test"
    )
    pixel = report.get("test", {}).get("pixel")
    if pixel:
        metrics += f"  pixel AUROC {pixel['auroc']:.4f}  PRO {pixel['pro']:.4f}"
    return (
        f"done: {metrics}  threshold {calibration.threshold:.6g} ({calibration.method} {calibration.target})"
    )


# ------------------------------------------------------------------------------------------- plots


def denormalise(x: torch.Tensor, prep_config) -> np.ndarray:
    """[B, C, H, W] normalised → [B, H, W, C] in [0, 1] for display."""
    mean = torch.tensor(prep_config.mean).view(1, -1, 1, 1)
    std = torch.tensor(prep_config.std).view(1, -1, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def write_plots(model, dataset, scored: ScoredSet, calibration: Calibration, out: Path, device) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plots.curves(scored.scores, scored.labels, out, calibration.threshold)
    order = np.argsort(scored.scores)
    anomalous = [i for i in order[::-1] if scored.labels[i] == 1][:3]
    normal = [i for i in order if scored.labels[i] == 0][:3]
    picks = [int(i) for i in anomalous + normal]
    x = torch.stack([images_of(dataset[i]) for i in picks])
    recon = model.example_reconstruction(x.to(device))
    recon = None if recon is None else denormalise(recon, model.config)
    titles = [f"{'anomalous' if scored.labels[i] else 'good'} {scored.scores[i]:.4g}" for i in picks]
    plots.example_grid(
        denormalise(x, model.config), recon, scored.heatmaps[picks], titles, out / "examples.png"
    )


# ------------------------------------------------------------------------------------------ commands


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    flags = {
        "model": args.model,
        "data.path": args.data,
        "out_dir": args.out,
        "optim.max_epochs": args.epochs,
        "device": args.device,
        "seed": args.seed,
    }
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    cfg = run_config.load(args.config, overrides)
    train_run(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    cfg = run_config.load(run_dir / "config.yaml", [f"data.path={args.data}"] if args.data else [])
    device = pick_device(args.device)
    model = load_model(run_dir, device)
    splits = load_splits(cfg.data, preprocessing_of(model, cfg.data.resize))
    if splits.test is None:
        raise ValueError(f"{cfg.data.path} has no labelled test split to evaluate on")
    scored = score_dataset(model, loader(splits.test, cfg.optim.batch_size, 0), device, not args.no_progress)
    calibration = Calibration.from_dict(json.loads((run_dir / "calibration.json").read_text()))
    out = Path(args.out) if args.out else run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report = {"data": splits.summary, "test": evaluation_report(scored, calibration)}
    write_json(out / "report.json", report)
    write_plots(model, splits.test, scored, calibration, out / "plots", device)
    print(summary_line(report, calibration))
    print(f"report: {out / 'report.json'}")
    return 0


def choose_threshold(calibration: dict[str, Any], choice: str) -> dict[str, Any]:
    """The calibration record with the verdict threshold to ship (``mnemo export --threshold``)."""
    if choice == "false_alarm_rate":
        return calibration
    if choice == "best_f1":
        if calibration.get("best_f1_threshold") is None:
            raise ValueError("--threshold best_f1: the run had no labelled test split to choose it on")
        return {**calibration, "threshold": calibration["best_f1_threshold"], "method": "best_f1"}
    try:
        value = float(choice)
    except ValueError:
        raise ValueError(
            f"--threshold must be false_alarm_rate, best_f1 or a number, got {choice!r}"
        ) from None
    return {**calibration, "threshold": value, "method": "manual"}


def cmd_export(args: argparse.Namespace) -> int:
    run_dir = Path(args.run)
    model = load_model(run_dir)
    cfg = run_config.load(run_dir / "config.yaml")
    report = json.loads((run_dir / "report.json").read_text())
    manifest = export_bundle(
        model,
        args.out,
        name=args.name or cfg.model,
        version=args.version or dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S"),
        preprocessing=preprocessing_of(model, cfg.data.resize).to_dict(),
        calibration=choose_threshold(json.loads((run_dir / "calibration.json").read_text()), args.threshold),
        samples=torch.load(run_dir / "samples.pt"),
        training={"run_config": cfg.to_dict(), "data": report.get("data"), "epochs": report.get("epochs")},
        metrics=report.get("test", {}),
        atol=args.atol,
    )
    diffs = manifest.training["export_max_abs_diff"]
    print(f"exported {manifest.name} {manifest.version} → {args.out}  (max |diff| vs PyTorch: {diffs})")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from mnemo.training.synthetic import generate

    summary = generate(
        args.out, texture=args.texture, size=args.size, n_train=args.train, n_test_good=args.test_good,
        n_test_defect=args.test_defect, seed=args.seed, rgb=args.rgb,
    )  # fmt: skip
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------- demo

# The shipped default model: DAAD on grayscale synthetic brick at 64 px. Narrower than the paper (widths
# 16/32/64, N = 100 per scale) and trained at Adam 1e-3, batch 16 rather than 1e-4, batch 8, so that it
# trains in about a minute and a half on 2 CPU cores; docs/training.md gives its figures.
DEMO_MODEL = "daad"
DEMO_TRAIN_IMAGES = 500  # 10 % (50) are held out to calibrate the threshold and p-values
DEMO_MODEL_CONFIG = {
    "in_channels": 1,
    "image_size": 64,
    "mean": (0.5,),
    "std": (0.5,),
    "widths": (16, 32, 64),
    "memory_size": 100,
}


def cmd_demo(args: argparse.Namespace) -> int:
    from mnemo.training.synthetic import generate

    out = Path(args.out)
    data = out / "data"
    if not (data / "dataset.json").is_file():
        generate(data, texture="brick", size=64, n_train=DEMO_TRAIN_IMAGES, seed=args.seed)
    cfg = run_config.RunConfig(
        model=DEMO_MODEL,
        model_config=dict(DEMO_MODEL_CONFIG),
        data=run_config.DataConfig(kind="folder", path=str(data)),
        optim=run_config.OptimConfig(lr=1e-3, batch_size=16, max_epochs=args.epochs),
        seed=args.seed,
        out_dir=str(out / "run"),
    )
    run_dir = train_run(cfg, progress=not args.no_progress)
    bundle = args.bundle or str(out / "bundle")
    export_args = argparse.Namespace(
        run=run_dir, out=bundle, name=args.name, version=None, threshold="false_alarm_rate", atol=1e-4
    )
    return cmd_export(export_args)
