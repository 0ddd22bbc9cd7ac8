"""The recipe of the shipped default bundle (``bundles/brick``), which ``mnemo demo`` rebuilds.

DAAD on grayscale synthetic brick at 64 px. Narrower than the paper (widths 16/32/64, N = 100 per scale)
and trained at Adam 1e-3, batch 16 rather than 1e-4, batch 8, so that it trains in about 2 minutes on 2
CPU cores; docs/training.md gives its figures.
"""

from __future__ import annotations

from pathlib import Path

from mnemo.training import config as run_config

DEMO_MODEL = "daad"
DEMO_TEXTURE = "brick"
DEMO_IMAGE_SIZE = 64
DEMO_TRAIN_IMAGES = 500  # 10 % (50) are held out to calibrate the threshold and p-values
DEMO_MODEL_CONFIG = {
    "in_channels": 1,
    "image_size": DEMO_IMAGE_SIZE,
    "mean": (0.5,),
    "std": (0.5,),
    "widths": (16, 32, 64),
    "memory_size": 100,
}
DEMO_OPTIM = {"lr": 1e-3, "batch_size": 16}


def demo_run_config(data: Path, run_dir: Path, epochs: int, seed: int) -> run_config.RunConfig:
    """The demo's training run on the synthetic set in ``data``, written to ``run_dir``."""
    return run_config.RunConfig(
        model=DEMO_MODEL,
        model_config=dict(DEMO_MODEL_CONFIG),
        data=run_config.DataConfig(kind="folder", path=str(data)),
        optim=run_config.OptimConfig(**DEMO_OPTIM, max_epochs=epochs),
        seed=seed,
        out_dir=str(run_dir),
    )
