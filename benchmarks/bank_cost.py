"""What a latent bank costs at scoring time: a kept ``+bank`` run beside the same weights without it.

Exports both scoring graphs to ONNX (``training.export.export_onnx``, as a bundle holds them) and times
them in one process, interleaved round by round, on ONNX Runtime with one thread (the service's setting
for a small model), at batch 1, 8 and 64: file sizes, median milliseconds per batch, and their ratio.

Usage: python -m mnemo.benchmarks.bank_cost RUN  (a run of ``mnemo bench accuracy --models memorizer+bank
--keep-runs``, or any run trained with ``model_config.latent_bank``)
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
from mnemo.training.export import INPUT_NAME, export_onnx
from mnemo.training.run import load_model

BATCHES = (1, 8, 64)


def without_bank(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture and weights with ``latent_bank: 0``: the papers' reconstruction score."""
    plain = models.create(model.model_name, **{**dataclasses.asdict(model.config), "latent_bank": 0})
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("bank.")})
    return plain.eval()


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
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each timing every graph (default 5)")
    parser.add_argument("--repeats", type=int, default=20, help="runs per graph per round (default 20)")
    args = parser.parse_args(argv)
    banked = load_model(args.run).eval()
    if getattr(banked, "bank", None) is None:
        parser.error(f"{args.run}: its model has no latent bank (train with model_config.latent_bank)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    shape = (1, banked.config.in_channels, banked.config.image_size, banked.config.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        sessions, sizes = {}, {}
        for name, model in (("plain", without_bank(banked)), ("bank", banked)):
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
