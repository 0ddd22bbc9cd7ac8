"""Why the reconstruction score fails on some held-out ROCO classes: it counts ink.

For each kept ROCO run (``mnemo bench accuracy --keep-runs``), per held-out class, the test AUROC of:
the model's own score (the mean squared error; a ``+bank`` run's own score is its bank's, and the
variance column then means nothing: rescore a plain run), the images' *ink* alone (mean pixel value above the
image's darkest, no model at all), the squared error divided by the image's pixel variance (the share
of the image the reconstruction misses), the error standardised per pixel position over training
images (restore's lever on real defects), and the same trained model scored with a latent bank of its
training images (``models/memory/latent_bank.py``: the error and the nearest training latent's
distances). Where the held-out class has less ink than the normal ones (MNIST 1s), the plain error ranks
it below normal whatever the model; the variance-normalised error undoes that on MNIST and does harm on
Fashion-MNIST, where the hard classes are near-duplicates of normal ones; the per-position one costs
MNIST about 2 points; the latent bank lifts both.

Usage: python -m mnemo.benchmarks.roco_scores --data ../shared/data/mnist --runs runs/roco
(one kept run per held-out class, all of one model on one data set)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from mnemo import models
from mnemo.benchmarks import kept_runs
from mnemo.benchmarks.accuracy_plan import BANK_SIZE

COLUMNS = (
    "model score",
    "ink alone",
    "model score / variance",
    "error standardised per position",
    "with a latent bank",
)
VARIANCE_FLOOR = 1e-8  # a blank image would divide by zero
POSITION_IMAGES = 6000  # training images that give each pixel position its error mean and spread


def position_standardised(model, train: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    """mean over pixels of (e - mu_p) / sigma_p: each position's squared error against its mean and spread
    on training images (sigma floored at a thousandth of the mean spread: never-inked corners)."""
    with torch.inference_mode():
        normal = torch.cat([model.error_map(b) for b in train[:POSITION_IMAGES].split(512)]).flatten(1)
        errors = torch.cat([model.error_map(b) for b in test.split(512)]).flatten(1)
    spread = normal.std(dim=0)
    spread = spread + 1e-3 * spread.mean()
    return ((errors - normal.mean(dim=0)) / spread).mean(dim=1).numpy()


def with_latent_bank(model, train: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    """The trained model's weights in a copy with a latent bank of every training image, filled as
    training fills it (``after_fit``); its scores of ``test``."""
    config = {**dataclasses.asdict(model.config), "latent_bank": max(BANK_SIZE, len(train))}
    banked = models.create(model.model_name, **config)
    missing, unexpected = banked.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not key.startswith("bank.") for key in missing):
        raise SystemExit(
            f"{model.model_name} does not take a latent bank (missing {missing}, extra {unexpected})"
        )
    banked.eval().after_fit(train.split(kept_runs.SCORE_BATCH))
    with torch.inference_mode():
        return torch.cat([banked.score(b)[0] for b in test.split(kept_runs.SCORE_BATCH)]).numpy()


def class_aurocs(run: kept_runs.KeptRun) -> tuple[int, tuple[float, ...]]:
    """(held-out class, one AUROC per column) of one kept run."""
    images, scores = run.test_images, run.test_scores()
    normalised = scores / (images.flatten(1).var(dim=1).numpy() + VARIANCE_FLOOR)
    train = run.splits.train.images_tensor()
    positional = position_standardised(run.model, train, images)
    banked = with_latent_bank(run.model, train, images)
    columns = (scores, kept_runs.ink(images), normalised, positional, banked)
    return run.target, tuple(100 * roc_auc_score(run.splits.test.labels, s) for s in columns)


def main(argv: list[str] | None = None) -> int:
    data, runs = kept_runs.parse(__doc__, argv, "ROCO")
    rows = sorted(class_aurocs(kept_runs.load(run, data, "roco")) for run in runs)
    targets = [target for target, _ in rows]
    if len(set(targets)) < len(targets):
        raise SystemExit(
            "the runs folder holds several runs of one class: keep one model and seed per folder"
        )
    print("| held-out class | " + " | ".join(COLUMNS) + " |\n| --- |" + " --- |" * len(COLUMNS))
    for target, values in rows:
        print(f"| {target} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    means = np.mean([values for _, values in rows], axis=0)
    print("| **average** | " + " | ".join(f"**{v:.1f}**" for v in means) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
