"""What a latent bank costs and buys: a kept ``+bank`` run beside the same weights without it.

Buys: the image AUROC of both on the run's labelled test split (its ``config.yaml``'s data, or
``--data``), when that split is at hand. Costs: exports both scoring graphs to ONNX
(``training.export.export_onnx``, as a bundle holds them) and times them in one process, interleaved round
by round, on ONNX Runtime with one thread (the service's setting for a small model), at batch 1, 8 and 64:
file sizes, median milliseconds per batch, and their ratio.

Usage: python -m mnemo.benchmarks.bank_cost RUN [--data DIR]  (a run of ``mnemo bench accuracy --models
memorizer+bank --keep-runs``, or any run trained with ``model_config.latent_bank``)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mnemo import models
from mnemo.training.evaluate import compute_metrics
from mnemo.training.export import INPUT_NAME, export_onnx
from mnemo.training.run import CONFIG_FILE, RunTestSplit, load_model

BATCHES = (1, 8, 64)


def without_bank(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture and weights with ``latent_bank: 0``: the papers' reconstruction score."""
    plain = models.create(model.model_name, **{**dataclasses.asdict(model.config), "latent_bank": 0})
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("bank.")})
    return plain.eval()


def aurocs_on_test_split(
    run: Path, models_by_name: dict[str, torch.nn.Module], data: str | None
) -> tuple[dict[str, float] | None, str | None]:
    """Image AUROC % of each model on the run's labelled test split, scored as ``mnemo evaluate`` scores
    it; None (and why) when that split is not here."""
    if not (run / CONFIG_FILE).exists():
        return None, f"no {CONFIG_FILE} in {run}"
    try:
        test = RunTestSplit.load(run, next(iter(models_by_name.values())), data)
    except (OSError, ValueError) as error:
        return None, str(error)
    aurocs = {}
    for name, model in models_by_name.items():
        if "image" not in (metrics := compute_metrics(test.score(model, torch.device("cpu"), False))):
            return None, "the test split holds one kind of image only (good or anomalous)"
        aurocs[name] = 100 * metrics["image"]["auroc"]
    return aurocs, None


def median_ms(sessions: dict[str, ort.InferenceSession], batch: np.ndarray, rounds: int, repeats: int):
    """Median milliseconds per run of each session, the sessions taking turns every round."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            session.run(None, {INPUT_NAME: batch})  # warm
            start = time.perf_counter()
            for _ in range(repeats):
                session.run(None, {INPUT_NAME: batch})
            times[name].append((time.perf_counter() - start) / repeats * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a run directory whose model has a filled latent bank")
    parser.add_argument("--data", help="the test data's path, when not where the run's config.yaml says")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each timing every graph (default 5)")
    parser.add_argument("--repeats", type=int, default=20, help="runs per graph per round (default 20)")
    args = parser.parse_args(argv)
    banked = load_model(args.run).eval()
    if getattr(banked, "bank", None) is None:
        parser.error(f"{args.run}: its model has no latent bank (train with model_config.latent_bank)")
    graphs = {"plain": without_bank(banked), "bank": banked}
    aurocs, why_not = aurocs_on_test_split(args.run, graphs, args.data)
    if aurocs is None:
        print(f"test AUROC not measured: {why_not}")
    else:
        gain = aurocs["bank"] - aurocs["plain"]
        print(f"test AUROC: plain {aurocs['plain']:.2f}, bank {aurocs['bank']:.2f} ({gain:+.2f})")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    shape = (1, banked.config.in_channels, banked.config.image_size, banked.config.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        sessions, sizes = {}, {}
        for name, model in graphs.items():
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, path, torch.rand(shape))
            sizes[name] = path.stat().st_size / 2**20
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        plain_mb, bank_mb = sizes["plain"], sizes["bank"]
        print(f"{len(banked.bank.norms)} latents; ONNX plain {plain_mb:.1f} MiB, bank {bank_mb:.1f} MiB")
        for size in BATCHES:
            batch = np.random.default_rng(0).random((size, *shape[1:]), dtype=np.float32)
            ms = median_ms(sessions, batch, args.rounds, args.repeats)
            ratio = ms["bank"] / ms["plain"]
            print(f"batch {size}: plain {ms['plain']:.2f} ms, bank {ms['bank']:.2f} ms ({ratio:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
