"""The model bundle: the directory ``mnemo export`` writes and the service loads.

    <bundle>/manifest.json   what the model is, how to feed it, how to threshold it, file checksums
    <bundle>/model.onnx      scoring forward, dynamic batch (ONNX Runtime backend)
    <bundle>/model.ts        the same, TorchScript (torch backend)
    <bundle>/reconstruction.onnx   x → x̂, for models that reconstruct (optional; ``reconstruction=true``)

This module is torch-free: the service reads and verifies bundles with it on the ONNX path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.ts"
RECONSTRUCTION_FILE = "reconstruction.onnx"
FORMAT_VERSION = 1


class BundleError(Exception):
    """A bundle is missing, malformed, or fails its checksums."""


@dataclass
class Manifest:
    name: str  # what clients call the model by (URL path segment)
    version: str  # bumps on every export; shown in responses and metrics
    architecture: str  # registry name: ae, memae, memorizer, rftm, daad, daad_plus, anomem
    model_config: dict[str, Any]  # the architecture's full config
    preprocessing: dict[str, Any]  # mnemo.imaging.Preprocessing.to_dict(): channels, size, mean, std…
    calibration: dict[str, Any]  # mnemo.calibration.Calibration.to_dict(): threshold, how chosen, quantiles
    files: dict[str, str]  # file name -> sha256
    # export_facts(): DAAD+'s min-max constants, restore's and a latent bank's image counts (the values
    # themselves are baked into the graph)
    score_scaling: dict[str, float] | None = None
    roi: dict[str, Any] | None = None  # {"file": "roi.png"}: only that part of the frame counts (mnemo.roi)
    tiling: dict[str, Any] | None = None  # {"tile", "overlap", "scale"}: scored tile by tile (mnemo.tiling)
    training: dict[str, Any] = field(default_factory=dict)  # data summary, epochs, seed, run config
    metrics: dict[str, Any] = field(
        default_factory=dict
    )  # evaluation report, when a labelled test set existed
    libraries: dict[str, str] = field(default_factory=dict)  # versions of torch, onnx, ... at export
    created: str = ""  # ISO-8601 UTC
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @property
    def threshold(self) -> float:
        return float(self.calibration["threshold"])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(bundle_dir: str | Path, verify_files: bool = True) -> Manifest:
    """Parse and validate ``manifest.json``; with ``verify_files``, check every file's sha256."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST_FILE}")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        found = raw.get("format_version")
        raise BundleError(f"{path}: format_version {found!r}, this Mnemo reads {FORMAT_VERSION}")
    names = {f.name for f in dataclasses.fields(Manifest)}
    required = {
        f.name
        for f in dataclasses.fields(Manifest)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(raw))
    if missing:
        raise BundleError(f"{path}: missing field(s) {missing}")
    manifest = Manifest(**{k: v for k, v in raw.items() if k in names})
    if "threshold" not in manifest.calibration:
        raise BundleError(f"{path}: calibration has no threshold")
    if verify_files:
        verify_checksums(bundle_dir, manifest)
    return manifest


def verify_checksums(bundle_dir: Path, manifest: Manifest) -> None:
    if not manifest.files:
        raise BundleError(f"{bundle_dir}: manifest lists no model files")
    for name, expected in manifest.files.items():
        file = bundle_dir / name
        if Path(name).name != name:
            raise BundleError(f"{bundle_dir}: file name {name!r} must not contain a path")
        if not file.is_file():
            raise BundleError(f"{bundle_dir}: {name} is listed in the manifest but missing")
        actual = sha256_of(file)
        if actual != expected:
            raise BundleError(
                f"{bundle_dir}: {name} is corrupt (sha256 {actual[:12]}…, manifest says {expected[:12]}…)"
            )
