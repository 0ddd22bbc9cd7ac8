"""``mnemo export``: the scoring forward as TorchScript and ONNX, verified, in a bundle (``mnemo.bundle``).

Both formats capture ``model.forward`` (= ``score``) in eval mode: inputs ``image [B, C, H, W]``, outputs
``score [B]`` and ``heatmap [B, 1, H, W]``, with a dynamic batch axis. The bundle checks itself before it
is kept: ONNX Runtime and the reloaded TorchScript file must both match PyTorch within ``atol`` on real
samples, or nothing is written and the error says by how much.

ONNX uses PyTorch's TorchScript-based exporter (``dynamo=False``): it exports the very graph we trace
for TorchScript, in a fraction of a second, and every op we use is covered at opset 17. PyTorch marks
it deprecated; the torch.export-based exporter is the path to move to when it is removed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from mnemo.bundle import MANIFEST_FILE, ONNX_FILE, RECONSTRUCTION_FILE, TORCHSCRIPT_FILE, Manifest, sha256_of
from mnemo.models.base import AnomalyModel
from mnemo.roi import ROI_FILE

ONNX_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "heatmap")
RECONSTRUCTION_OUTPUT = "reconstruction"
# float32 rounding grows with the values: the restore recipe's standardised heatmaps reach tens and ONNX
# Runtime's kernels differ from PyTorch's by ~1e-4 of that; a wrong graph differs by the values' own size
EXPORT_RTOL = 1e-3
LIBRARIES = ("mnemo", "torch", "onnx", "onnxruntime", "numpy")


class ExportMismatchError(RuntimeError):
    """An exported copy disagrees with PyTorch beyond tolerance."""


# ------------------------------------------------------------------------------------------ formats


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


def export_onnx(
    model: torch.nn.Module, path: str | Path, example: torch.Tensor, outputs: tuple[str, ...] = OUTPUT_NAMES
) -> None:
    """Export the module's forward (the scoring forward by default) to ONNX with a dynamic batch axis."""
    model = model.eval()
    dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
        )


class ReconstructionGraph(torch.nn.Module):
    """x → x̂, the model's reconstruction (``example_reconstruction``): what the memory takes this part to
    look like without its defect, served on request (``reconstruction=true``, issue 14)."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.example_reconstruction(x)


def export_reconstruction(
    model: AnomalyModel, path: Path, samples: torch.Tensor, atol: float
) -> float | None:
    """Write ``reconstruction.onnx`` when the model reconstructs; returns its max |diff| against PyTorch,
    None (and no file) for a model without a reconstruction (AnoMem)."""
    with torch.no_grad():
        reference = model.example_reconstruction(samples)
    if reference is None:
        return None
    export_onnx(ReconstructionGraph(model), path, samples[:2], outputs=(RECONSTRUCTION_OUTPUT,))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (rebuilt,) = session.run(None, {INPUT_NAME: samples.numpy()})
    return check_close("reconstruction (ONNX Runtime)", (reference.numpy(),), (rebuilt,), atol)


# ----------------------------------------------------------------------------------------- checking


def max_abs_diff(a: tuple, b: tuple) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def check_close(name: str, reference: tuple, candidate: tuple, atol: float = 1e-4) -> float:
    """Raise ``ExportMismatchError`` if an output differs by more than ``atol`` + ``EXPORT_RTOL`` × its
    magnitude (its largest |value|); return the max absolute diff."""
    for ref, cand, out in zip(reference, candidate, OUTPUT_NAMES):
        if np.shape(ref) != np.shape(cand):
            raise ExportMismatchError(f"{name}: {out} shape {np.shape(cand)} != PyTorch {np.shape(ref)}")
        diff = max_abs_diff((ref,), (cand,))
        allowed = atol + EXPORT_RTOL * (float(np.max(np.abs(ref))) if np.size(ref) else 0.0)
        if not diff <= allowed:
            raise ExportMismatchError(
                f"{name} {out} differs from PyTorch by {diff:.3g} (tolerance {allowed:.3g} = {atol:g} + "
                f"{EXPORT_RTOL:g} × its largest |value|)"
            )
    return max_abs_diff(reference, candidate)


def verify(model: torch.nn.Module, bundle_dir: Path, samples: torch.Tensor, atol: float) -> dict[str, float]:
    """Max |difference| of each exported copy against PyTorch on ``samples``; raises on a mismatch."""
    with torch.no_grad():
        reference = tuple(t.numpy() for t in model(samples))
        loaded = torch.jit.load(str(bundle_dir / TORCHSCRIPT_FILE), map_location="cpu")
        ts_out = tuple(t.numpy() for t in loaded(samples))
    session = ort.InferenceSession(str(bundle_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    onnx_out = tuple(
        np.asarray(o) for o in session.run(None, {session.get_inputs()[0].name: samples.numpy()})
    )
    return {
        "onnxruntime": check_close("ONNX Runtime", reference, onnx_out, atol),
        "torchscript": check_close("TorchScript", reference, ts_out, atol),
    }


# ------------------------------------------------------------------------------------------- bundle


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def export_bundle(
    model: AnomalyModel,
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    preprocessing: dict[str, Any],
    calibration: dict[str, Any],
    samples: torch.Tensor,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    tiling: dict[str, Any] | None = None,
    roi: Path | None = None,
    atol: float = 1e-4,
) -> Manifest:
    """Export, verify, and only then move the finished bundle into ``out_dir`` (replacing an old one).
    ``tiling`` (``mnemo.tiling.Tiling.to_dict``): the bundle scores images tile by tile. ``roi``: a mask
    PNG the bundle carries (checksummed) and scores inside (``mnemo.roi``)."""
    facts = model.export_facts()  # first: a model not ready to export raises before anything is written
    model = model.eval().cpu()
    samples = samples.detach().cpu().float()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        export_onnx(model, staging / ONNX_FILE, samples[:2])
        export_torchscript(model, staging / TORCHSCRIPT_FILE, samples[:2])
        diffs = verify(model, staging, samples, atol)
        rebuilt = export_reconstruction(model, staging / RECONSTRUCTION_FILE, samples, atol)
        if rebuilt is not None:
            diffs["reconstruction"] = rebuilt
        if roi is not None:
            shutil.copyfile(roi, staging / ROI_FILE)
        files = [
            f for f in (ONNX_FILE, TORCHSCRIPT_FILE, RECONSTRUCTION_FILE, ROI_FILE) if (staging / f).is_file()
        ]
        manifest = Manifest(
            name=name,
            version=version,
            architecture=model.model_name,
            model_config=dataclasses.asdict(model.config),
            preprocessing=preprocessing,
            calibration=calibration,
            files={f: sha256_of(staging / f) for f in files},
            score_scaling=facts,
            training={**(training or {}), "export_max_abs_diff": diffs},
            metrics=metrics or {},
            tiling=tiling,
            roi={"file": ROI_FILE} if roi is not None else None,
            libraries=library_versions(),
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.chmod(0o755)  # mkdtemp makes it private; a service under another user must read it
        staging.rename(out_dir)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
