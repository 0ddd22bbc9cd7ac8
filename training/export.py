"""Export a model's scoring forward to TorchScript and ONNX, and check the copies against PyTorch.

Both formats capture ``model.forward`` (= ``score``) in eval mode: inputs ``image [B, C, H, W]``, outputs
``score [B]`` and ``heatmap [B, 1, H, W]``, with a dynamic batch axis.

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``): it exports the very graph we trace
for TorchScript, in a fraction of a second, and every op we use is covered at opset 17. PyTorch marks
it deprecated; the torch.export-based exporter is the path to move to when it is removed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "heatmap")


class ExportMismatchError(RuntimeError):
    """An exported copy disagrees with PyTorch beyond tolerance."""


def example_input(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def export_torchscript(
    model: torch.nn.Module, path: str | Path, example: torch.Tensor
) -> torch.jit.ScriptModule:
    """Trace the scoring forward and save it; returns the traced module."""
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(path))
    return traced


def export_onnx(model: torch.nn.Module, path: str | Path, example: torch.Tensor) -> None:
    """Export the scoring forward to ONNX with a dynamic batch axis."""
    model = model.eval()
    dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
        )


def max_abs_diff(a: tuple, b: tuple) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def check_close(name: str, reference: tuple, candidate: tuple, atol: float = 1e-4) -> float:
    """Raise ``ExportMismatchError`` if any output differs by more than ``atol``; return the max diff."""
    for ref, cand, out in zip(reference, candidate, OUTPUT_NAMES):
        if np.shape(ref) != np.shape(cand):
            raise ExportMismatchError(f"{name}: {out} shape {np.shape(cand)} != PyTorch {np.shape(ref)}")
    diff = max_abs_diff(reference, candidate)
    if not diff <= atol:
        raise ExportMismatchError(f"{name} output differs from PyTorch by {diff:.3g} (tolerance {atol:g})")
    return diff
