"""``mnemo export --triton``: a Triton model repository whose config parses as Triton's own ``ModelConfig``
(tritonclient's protobuf, not ours) and matches the ONNX graph it ships; the calibration beside it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mnemo.bundle import read_manifest
from tests.test_training import mnemo, trained_run  # noqa: F401 (the module fixture)


def test_export_writes_a_triton_repository_that_matches_its_graph(trained_run):  # noqa: F811
    root, _, run = trained_run
    bundle, repo = root / "tbundle", root / "triton"
    done = mnemo("export", str(run), "--out", str(bundle), "--name", "part", "--version", "20261201",
                 "--triton", str(repo))  # fmt: skip
    assert "Triton model repository" in done.stdout
    model = repo / "part"
    config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("part", "onnxruntime_onnx", 16)
    assert config.HasField("dynamic_batching")
    graph = onnx.load(str(model / "20261201" / "model.onnx")).graph
    (graph_input,) = graph.input
    assert [i.name for i in config.input] == [graph_input.name]
    assert [o.name for o in config.output] == [o.name for o in graph.output] == ["score", "heatmap"]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:]]
    assert list(config.input[0].dims) == dims == [1, 32, 32]  # Triton's dims leave out the batch
    # Triton adds the batch to each declared shape: check that against what the graph outputs.
    session = ort.InferenceSession(str(model / "20261201" / "model.onnx"), providers=["CPUExecutionProvider"])
    score, heat = session.run(None, {"image": np.zeros((3, *dims), np.float32)})
    assert score.shape == (3, *config.output[0].reshape.shape) and list(config.output[0].dims) == [1]
    assert heat.shape == (3, *config.output[1].dims)
    sidecar = json.loads((model / "mnemo.json").read_text())
    manifest = read_manifest(bundle)
    assert (
        sidecar["calibration"] == manifest.calibration and sidecar["preprocessing"] == manifest.preprocessing
    )
