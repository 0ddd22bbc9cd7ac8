"""One check for every export test: TorchScript and ONNX copies score like PyTorch at another batch size."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from mnemo.training.export import check_close, export_onnx, export_torchscript


def assert_exports_match(
    model: torch.nn.Module, export_batch: torch.Tensor, run_batch: torch.Tensor, tmp_path
):
    """Export at one batch size, run at another (dynamic batch), compare both copies within 1e-4."""
    model = model.eval()
    with torch.no_grad():
        reference = tuple(t.numpy() for t in model.score(run_batch))
    export_torchscript(model, tmp_path / "model.ts", export_batch)
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        check_close("torchscript", reference, tuple(t.numpy() for t in loaded(run_batch)))
    export_onnx(model, tmp_path / "model.onnx", export_batch)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["score", "heatmap"]
    outputs = session.run(None, {"image": run_batch.numpy()})
    check_close("onnx", reference, tuple(np.asarray(o) for o in outputs))
