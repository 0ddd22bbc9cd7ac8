"""Why the reconstruction score fails on some held-out ROCO classes: it counts ink.

For each kept ROCO run (``mnemo bench accuracy --keep-runs``), per held-out class, the test AUROC of:
the model's own score (the mean squared error), the images' *ink* alone (mean pixel value above the
image's darkest, no model at all), the squared error divided by the image's pixel variance (the share
of the image the reconstruction misses), and the error standardised per pixel position over training
images (restore's lever on real defects). Where the held-out class has less ink than the normal ones
(MNIST 1s), the plain error ranks it below normal whatever the model; the variance-normalised error
undoes that on MNIST and does harm on Fashion-MNIST, where the hard classes are near-duplicates of
normal ones; the per-position one costs MNIST about 2 points.

Usage: python -m mnemo.benchmarks.roco_scores --data ../shared/data/mnist --runs runs/roco
(one kept run per held-out class, all of one model on one data set)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from mnemo.imaging import Preprocessing
from mnemo.training.datasets import idx_splits
from mnemo.training.run import load_model

COLUMNS = ("model score", "ink alone", "model score / variance", "error standardised per position")
VARIANCE_FLOOR = 1e-8  # a blank image would divide by zero
POSITION_IMAGES = 6000  # training images that give each pixel position its error mean and spread


def ink(images: torch.Tensor) -> np.ndarray:
    """Each image's mean pixel value above its darkest pixel: how much it draws, with no model at all."""
    x = images.flatten(1)
    return (x - x.min(dim=1, keepdim=True).values).mean(dim=1).numpy()


def position_standardised(model, train: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    """mean over pixels of (e - mu_p) / sigma_p: each position's squared error against its mean and spread
    on training images (sigma floored at a thousandth of the mean spread: never-inked corners)."""
    with torch.inference_mode():
        normal = torch.cat([model.error_map(b) for b in train[:POSITION_IMAGES].split(512)]).flatten(1)
        errors = torch.cat([model.error_map(b) for b in test.split(512)]).flatten(1)
    spread = normal.std(dim=0)
    spread = spread + 1e-3 * spread.mean()
    return ((errors - normal.mean(dim=0)) / spread).mean(dim=1).numpy()


def class_aurocs(run: Path, data: Path) -> tuple[int, tuple[float, ...]]:
    """(held-out class, one AUROC per column) of one kept run."""
    report = json.loads((run / "report.json").read_text())
    if report["data"].get("protocol") != "roco":
        raise SystemExit(f"{run} is not a ROCO run (protocol {report['data'].get('protocol')!r})")
    target = int(report["data"]["target_class"])
    model = load_model(run)
    splits = idx_splits(data, "roco", target, Preprocessing.from_model_config(model.config))
    test = splits.test
    images = test.images_tensor()  # the test set decoded once: scored, and measured without a model
    with torch.inference_mode():
        scores = torch.cat([model.score(batch)[0] for batch in images.split(512)]).numpy()
    normalised = scores / (images.flatten(1).var(dim=1).numpy() + VARIANCE_FLOOR)
    positional = position_standardised(model, splits.train.images_tensor(), images)
    columns = (scores, ink(images), normalised, positional)
    return target, tuple(100 * roc_auc_score(test.labels, s) for s in columns)


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--data", type=Path, required=True, help="the IDX folder the runs trained on")
    parser.add_argument("--runs", type=Path, required=True, help="folder of kept run directories")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = sorted(p.parent for p in args.runs.glob("*/report.json") if (p.parent / "model.pt").is_file())
    if not runs:
        parser.error(f"no finished runs under {args.runs} (train with --keep-runs)")
    rows = sorted(class_aurocs(run, args.data) for run in runs)
    targets = [target for target, _ in rows]
    if len(set(targets)) < len(targets):
        parser.error(f"{args.runs} holds several runs of one class: keep one model and seed per folder")
    print("| held-out class | " + " | ".join(COLUMNS) + " |\n| --- |" + " --- |" * len(COLUMNS))
    for target, values in rows:
        print(f"| {target} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    means = np.mean([values for _, values in rows], axis=0)
    print("| **average** | " + " | ".join(f"**{v:.1f}**" for v in means) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
