"""Where a one-class model loses AUROC: one anomalous class at a time.

An AUROC is the share of (anomalous, normal) pairs ranked the right way, so a one-class run's AUROC is
exactly the average, weighted by class size, of its AUROCs on the normal test images against each
anomalous class alone; ``points lost`` is each class's share of the gap to 100. Beside the model's own
score, two model-free detectors on the same images: their *ink* (``roco_scores.ink``) and the pixel
distance to the nearest normal training image (1-NN). Where the 1-NN is also near 50 for a class, its
images lie among the normal ones in pixel space (MNIST 1s against a model of 8s: a 1 is an 8's spine),
and a reconstruction score has little to go on.

Usage: python -m mnemo.benchmarks.one_class_scores --data ../shared/data/mnist --runs runs/one-class
(kept one-class runs: ``mnemo bench accuracy --models daad --max-epochs 5 --keep-runs --work runs/one-class``)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from mnemo.benchmarks.roco_scores import ink
from mnemo.imaging import Preprocessing
from mnemo.training.datasets import idx_splits, load_idx
from mnemo.training.run import load_model

DETECTORS = ("model score", "ink alone", "nearest normal (1-NN)")
NEIGHBOUR_CHUNK = 500  # test images per distance block: 500 × ~6000 normal images of floats


def nearest_normal(train: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    """Each test image's Euclidean pixel distance to its nearest normal training image."""
    normal = train.flatten(1)
    blocks = test.flatten(1).split(NEIGHBOUR_CHUNK)
    return torch.cat([torch.cdist(block, normal).min(dim=1).values for block in blocks]).numpy()


def class_table(run: Path, data: Path) -> tuple[int, list[tuple[str, int, float, tuple[float, ...]]]]:
    """(normal class, rows): per anomalous class and for all of them, (name, count, points lost, AUROCs)."""
    report = json.loads((run / "report.json").read_text())
    if report["data"].get("protocol") != "one_class":
        raise SystemExit(f"{run} is not a one-class run (protocol {report['data'].get('protocol')!r})")
    normal_class = int(report["data"]["target_class"])
    model = load_model(run)
    splits = idx_splits(data, "one_class", normal_class, Preprocessing.from_model_config(model.config))
    images = splits.test.images_tensor()
    with torch.inference_mode():
        scores = torch.cat([model.score(batch)[0] for batch in images.split(256)]).numpy()
    columns = (scores, ink(images), nearest_normal(splits.train.images_tensor(), images))
    classes = load_idx(data, "test")[1]  # the one-class test split keeps the test set's order
    anomalous = classes != normal_class
    rows = []
    for name in [*sorted(set(classes[anomalous].tolist())), "all"]:
        pick = ~anomalous | (anomalous if name == "all" else classes == name)
        aurocs = tuple(100 * roc_auc_score(anomalous[pick], c[pick]) for c in columns)
        count = int((pick & anomalous).sum())
        rows.append((str(name), count, count / anomalous.sum() * (100 - aurocs[0]), aurocs))
    return normal_class, rows


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--data", type=Path, required=True, help="the IDX folder the runs trained on")
    parser.add_argument("--runs", type=Path, required=True, help="folder of kept one-class run directories")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = sorted(p.parent for p in args.runs.glob("*/report.json") if (p.parent / "model.pt").is_file())
    if not runs:
        parser.error(f"no finished runs under {args.runs} (train with --keep-runs)")
    for run in runs:
        normal_class, rows = class_table(run, args.data)
        print(f"\n### Normal class {normal_class} ({run.name})\n")
        print("| anomalous class | images | points lost | " + " | ".join(DETECTORS) + " |")
        print("| --- | --- | --- |" + " --- |" * len(DETECTORS))
        for name, count, lost, aurocs in rows:
            print(f"| {name} | {count} | {lost:.1f} | " + " | ".join(f"{v:.1f}" for v in aurocs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
