"""Untrained bundles for the serving benchmark: inference speed depends on the graph, not on the weights.

Each is exported through ``training.export.export_bundle`` (so it is verified like any bundle) with a dummy
calibration fitted to the untrained model's own scores on random inputs: thresholds and p-values are
meaningless, timings are real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECS: dict[str, dict[str, Any]] = {
    "mnist": {
        "model": "memorizer",
        "config": {"memory_size": 8},  # paper 000's MNIST setting, 28×28 gray, FC backbone
        "what": "untrained memorizer (N=8, FC backbone), 28×28 gray, dummy calibration",
    },
    "daad256": {
        "model": "daad",
        "config": {},  # paper 003's default: 256×256 RGB, widths 32…256, N = 500 per scale
        "what": "untrained default-config DAAD, 256×256 RGB, dummy calibration",
    },
}


def export_untrained(name: str, out: Path, seed: int = 0) -> Path:
    import torch

    from mnemo import models
    from mnemo.imaging import Preprocessing
    from mnemo.training.calibration import calibrate
    from mnemo.training.export import export_bundle

    spec = SPECS[name]
    torch.manual_seed(seed)
    model = models.create(spec["model"], **spec["config"]).eval()
    cfg = model.config
    x = torch.rand(4, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        scores = model(x)[0].numpy()
    calibration = calibrate(scores, false_alarm_rate=0.25)
    export_bundle(
        model, out, name=name, version="bench", preprocessing=Preprocessing.from_model_config(cfg).to_dict(),
        calibration=calibration.to_dict(), samples=x, training={"note": spec["what"]},
    )  # fmt: skip
    return out
