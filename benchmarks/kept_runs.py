"""Rescoring kept IDX runs (``mnemo bench accuracy --keep-runs``): what ``roco_scores`` and
``one_class_scores`` share: finding the runs, reloading one with its splits, scoring, and the two
model-free detectors set beside a model (ink, nearest normal image)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnemo.imaging import Preprocessing
from mnemo.training.datasets import Splits, idx_splits
from mnemo.training.run import load_model

SCORE_BATCH = 512
NEIGHBOUR_CHUNK = 500  # test images per distance block: 500 × the normal images, as floats


@dataclass
class KeptRun:
    """One kept run reloaded: its class (held out or normal), model, splits and decoded test images."""

    target: int
    model: torch.nn.Module
    splits: Splits
    test_images: torch.Tensor

    def test_scores(self) -> np.ndarray:
        """The model's own anomaly score of every test image, as the benchmark computed it."""
        with torch.inference_mode():
            return torch.cat([self.model.score(b)[0] for b in self.test_images.split(SCORE_BATCH)]).numpy()


def load(run: Path, data: Path, protocol: str | None = None) -> KeptRun:
    """Reload ``run`` on the IDX folder it trained on; SystemExit if it was trained under another protocol
    than ``protocol`` (None: any)."""
    report = json.loads((run / "report.json").read_text())
    trained = report["data"].get("protocol")
    if protocol is not None and trained != protocol:
        raise SystemExit(f"{run} is not a {protocol} run (protocol {trained!r})")
    target = int(report["data"]["target_class"])
    model = load_model(run)
    splits = idx_splits(data, trained, target, Preprocessing.from_model_config(model.config))
    return KeptRun(target, model, splits, splits.test.images_tensor())


def ink(images: torch.Tensor) -> np.ndarray:
    """Each image's mean pixel value above its darkest pixel: how much it draws, with no model at all."""
    x = images.flatten(1)
    return (x - x.min(dim=1, keepdim=True).values).mean(dim=1).numpy()


def nearest_normal(train: torch.Tensor, test: torch.Tensor) -> np.ndarray:
    """Each test image's Euclidean pixel distance to its nearest normal training image (a 1-NN)."""
    normal = train.flatten(1)
    blocks = test.flatten(1).split(NEIGHBOUR_CHUNK)
    return torch.cat([torch.cdist(block, normal).min(dim=1).values for block in blocks]).numpy()


def parse(doc: str, argv: list[str] | None, what: str) -> tuple[Path, list[Path]]:
    """(IDX folder, finished kept runs) from the command line; one thread, as the runs were trained."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the IDX folder the runs trained on")
    parser.add_argument("--runs", type=Path, required=True, help=f"folder of kept {what} run directories")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = sorted(p.parent for p in args.runs.glob("*/report.json") if (p.parent / "model.pt").is_file())
    if not runs:
        parser.error(f"no finished runs under {args.runs} (train with --keep-runs)")
    return args.data, runs
