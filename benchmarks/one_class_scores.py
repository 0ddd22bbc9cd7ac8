"""Where a one-class model loses AUROC: one anomalous class at a time.

An AUROC is the share of (anomalous, normal) pairs ranked the right way, so a one-class run's AUROC is
exactly the average, weighted by class size, of its AUROCs on the normal test images against each
anomalous class alone; ``points lost`` is each class's share of the gap to 100. Beside the model's own
score, two model-free detectors on the same images (``kept_runs``): their *ink* and the pixel distance
to the nearest normal training image (1-NN). Where the 1-NN is also near 50 for a class, its images lie
among the normal ones in pixel space (MNIST 1s against a model of 8s: a 1 is an 8's spine), and a
reconstruction score has little to go on.

Usage: python -m mnemo.benchmarks.one_class_scores --data ../shared/data/mnist --runs runs/one-class
(kept one-class runs: ``mnemo bench accuracy --models daad --max-epochs 5 --keep-runs --work runs/one-class``)
"""

from __future__ import annotations

from pathlib import Path

from sklearn.metrics import roc_auc_score

from mnemo.benchmarks import kept_runs
from mnemo.training.datasets import load_idx

DETECTORS = ("model score", "ink alone", "nearest normal (1-NN)")


def class_table(run: kept_runs.KeptRun, data: Path) -> list[tuple[str, int, float, tuple[float, ...]]]:
    """Per anomalous class and for all of them: (name, images, points lost, one AUROC per detector)."""
    images = run.test_images
    columns = (
        run.test_scores(),
        kept_runs.ink(images),
        kept_runs.nearest_normal(run.splits.train.images_tensor(), images),
    )
    classes = load_idx(data, "test")[1]  # the one-class test split keeps the test set's order
    anomalous = classes != run.target
    rows = []
    for name in [*sorted(set(classes[anomalous].tolist())), "all"]:
        pick = ~anomalous | (anomalous if name == "all" else classes == name)
        aurocs = tuple(100 * roc_auc_score(anomalous[pick], c[pick]) for c in columns)
        count = int((pick & anomalous).sum())
        rows.append((str(name), count, count / anomalous.sum() * (100 - aurocs[0]), aurocs))
    return rows


def main(argv: list[str] | None = None) -> int:
    data, runs = kept_runs.parse(__doc__, argv, "one-class")
    for path in runs:
        run = kept_runs.load(path, data, "one_class")
        print(f"\n### Normal class {run.target} ({path.name})\n")
        print("| anomalous class | images | points lost | " + " | ".join(DETECTORS) + " |")
        print("| --- | --- | --- |" + " --- |" * len(DETECTORS))
        for name, count, lost, aurocs in class_table(run, data):
            print(f"| {name} | {count} | {lost:.1f} | " + " | ".join(f"{v:.1f}" for v in aurocs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
