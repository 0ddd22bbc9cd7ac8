"""``mnemo export RUN --out BUNDLE --triton REPO``: the bundle as a Triton model repository (issue 15).

A plant that already runs Triton Inference Server can serve Mnemo's models there:

    <repo>/<name>/config.pbtxt            ONNX Runtime backend, dynamic batching
    <repo>/<name>/<version>/model.onnx    the bundle's verified graph, unchanged
    <repo>/<name>/mnemo.json              preprocessing and calibration: what the client must then do

Triton runs the graph only: ``image`` FP32 [C, H, W] in the model's normalisation in, ``score`` and
``heatmap`` out. Decoding and normalising (``mnemo.imaging.preprocess``), the verdict (score > threshold)
and p-values (``mnemo.calibration.p_value`` on the stored quantiles) become the client's job; the
numbers they need are in ``mnemo.json``. Triton's version folders are integers: a numeric bundle
version (the default UTC timestamp) is used as is, any other becomes 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mnemo.bundle import ONNX_FILE, Manifest, read_manifest
from mnemo.training.export import INPUT_NAME, OUTPUT_NAMES

CONFIG_FILE = "config.pbtxt"
SIDECAR_FILE = "mnemo.json"
MAX_BATCH_SIZE = 16  # as the service's default MNEMO_MAX_BATCH_SIZE
QUEUE_DELAY_US = 1000  # Triton waits up to 1 ms for batch mates


def triton_config(manifest: Manifest, max_batch_size: int = MAX_BATCH_SIZE) -> str:
    """``config.pbtxt`` (protobuf text of Triton's ``ModelConfig``) for the bundle's ONNX graph."""
    pre = manifest.preprocessing
    image = f"[ {pre['channels']}, {pre['size']}, {pre['size']} ]"
    score, heatmap = OUTPUT_NAMES
    return f"""name: "{manifest.name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: {image} }}
]
output [
  {{ name: "{score}" data_type: TYPE_FP32 dims: [ 1 ] reshape: {{ shape: [ ] }} }},
  {{ name: "{heatmap}" data_type: TYPE_FP32 dims: [ 1, {pre["size"]}, {pre["size"]} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US} }}
instance_group [ {{ kind: KIND_AUTO count: 1 }} ]
version_policy {{ latest {{ num_versions: 1 }} }}
"""


def write_triton_repository(bundle: Path, repo: Path, max_batch_size: int = MAX_BATCH_SIZE) -> Path:
    """Add the bundle as a model to the Triton repository ``repo`` (its folder replaced); returns it."""
    manifest = read_manifest(bundle)
    model_dir = Path(repo) / manifest.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    version = manifest.version if manifest.version.isdigit() else "1"
    (model_dir / version).mkdir(parents=True)
    shutil.copy2(Path(bundle) / ONNX_FILE, model_dir / version / "model.onnx")
    (model_dir / CONFIG_FILE).write_text(triton_config(manifest, max_batch_size))
    sidecar = {
        "name": manifest.name,
        "version": manifest.version,
        "architecture": manifest.architecture,
        "preprocessing": manifest.preprocessing,
        "calibration": manifest.calibration,
        "rule": "anomalous iff score > calibration.threshold; p-value: mnemo.calibration.p_value",
    }
    if manifest.tiling:  # the graph scores tiles: cutting and merging (mnemo.tiling) are the client's too
        sidecar["tiling"] = manifest.tiling
        sidecar["rule"] += "; tiled: the frame's score is its worst tile's (mnemo.tiling.Tiling.merge)"
    (model_dir / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=1))
    return model_dir
