"""The served models: discover bundles in the model directory, verify, load, warm up, swap on reload.

A bundle that fails (bad manifest, checksum mismatch, graph that does not match its manifest, duplicate
name) is refused with one log line and the others keep serving. On reload, a bundle that now fails keeps
its previously loaded version; a bundle whose files are unchanged keeps its running instance (no
warm-up, no disruption); a bundle that disappeared is unloaded after its queued requests finish.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnemo.bundle import MANIFEST_FILE, RECONSTRUCTION_FILE, BundleError, Manifest, read_manifest
from mnemo.calibration import Calibration
from mnemo.imaging import Preprocessing
from mnemo.roi import RoiError, mask_from_image
from mnemo.service.backends import ReconstructionRunner, Runner, create_runner
from mnemo.service.batching import DynamicBatcher
from mnemo.service.decoding import release_free_memory
from mnemo.service.metrics import ModelMetrics, ServiceMetrics
from mnemo.service.schemas import ModelInfo
from mnemo.service.settings import Settings
from mnemo.tiling import Tiling

logger = logging.getLogger("mnemo.service")

ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/(?!/)[^\s\"'<>,;]+")  # what public_reason hides (not a URL's //)
# Model names are URL path segments in `/v1/models/{name}:score`.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class LoadedModel:
    manifest: Manifest
    path: Path
    runner: Runner
    preprocessing: Preprocessing
    calibration: Calibration
    loaded_at: float = field(default_factory=time.time)
    reconstructor: ReconstructionRunner | None = None  # bundles with reconstruction.onnx
    roi: np.ndarray | None = None  # bool [size, size] (tiled: working resolution): region of interest
    tiling: Tiling | None = None  # scored tile by tile (mnemo.tiling)
    batcher: DynamicBatcher | None = None  # set when the store starts serving it
    metrics: ModelMetrics | None = None  # likewise
    quantiles: np.ndarray = field(init=False)  # as an array once, not per request

    def __post_init__(self) -> None:
        self.quantiles = np.asarray(self.calibration.quantiles, np.float64)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    def info(self) -> ModelInfo:
        """The model's facts, listed once: ``/v1/models`` shows them all, ``mnemo_model_info`` a few."""
        m = self.manifest
        return ModelInfo(
            name=m.name,
            version=m.version,
            architecture=m.architecture,
            backend=self.runner.backend,
            device=self.runner.device,
            input_channels=self.preprocessing.channels,
            input_size=self.preprocessing.size,
            preprocessing=self.preprocessing.to_dict(),
            threshold=self.threshold,
            calibration_method=self.calibration.method,
            pixel_threshold=self.calibration.pixel.threshold if self.calibration.pixel else None,
            reconstruction=self.reconstructor is not None,
            roi=self.roi is not None,
            tiling=m.tiling,
            metrics=m.metrics,
            created=m.created,
            loaded_at=self.loaded_at,
        )

    def same_files(self, manifest: Manifest) -> bool:
        return manifest.version == self.manifest.version and manifest.files == self.manifest.files


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)  # newly loaded or replaced by a new version
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # reload failed, previous version still served
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # bundle path -> reason


def discover(model_dir: Path) -> list[Path]:
    """The bundle directories: ``model_dir`` itself if it is one, else its non-hidden subdirectories."""
    if (model_dir / MANIFEST_FILE).is_file():
        return [model_dir]
    if not model_dir.is_dir():
        raise BundleError(f"model directory {model_dir} does not exist")
    return sorted(p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_outputs(runner: Runner, pre: Preprocessing, batch: int) -> None:
    """Run a zero batch and check the scoring contract's shapes; doubles as the warm-up."""
    x = np.zeros((batch, pre.channels, pre.size, pre.size), dtype=np.float32)
    try:
        score, heatmap = runner.run(x)
    except Exception as exc:
        raise BundleError(f"model does not run on {list(x.shape[1:])} input ({exc})") from None
    if score.shape != (batch,) or heatmap.shape != (batch, 1, pre.size, pre.size):
        raise BundleError(
            f"model outputs score {list(score.shape)} and heatmap {list(heatmap.shape)} for a batch of "
            f"{batch} × {list(x.shape[1:])}; expected [{batch}] and [{batch}, 1, {pre.size}, {pre.size}]"
        )


def load_bundle(path: Path, settings: Settings, previous: LoadedModel | None = None) -> LoadedModel:
    """Verify and load one bundle; reuse ``previous`` when its files are unchanged."""
    manifest = read_manifest(path)
    if previous is not None and previous.path == path and previous.same_files(manifest):
        return previous
    if not NAME_PATTERN.match(manifest.name):
        raise BundleError(f"model name {manifest.name!r} must match {NAME_PATTERN.pattern}")
    try:
        pre = Preprocessing.from_dict(manifest.preprocessing)
        calibration = Calibration.from_dict(manifest.calibration)
        tiling = load_tiling(manifest, pre)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"manifest preprocessing/calibration/tiling invalid ({exc})") from None
    runner = create_runner(
        path, settings.backend, settings.device, settings.intra_op_threads, settings.ort_spinning
    )
    declared = (pre.channels, pre.size, pre.size)
    if any(g is not None and g != d for g, d in zip(runner.input_shape, declared)):
        raise BundleError(
            f"graph input {list(runner.input_shape)} != manifest preprocessing {list(declared)}"
        )
    for batch in sorted({1, settings.max_batch_size}):
        check_outputs(runner, pre, batch)
    reconstructor = None
    if RECONSTRUCTION_FILE in manifest.files:
        reconstructor = ReconstructionRunner(path / RECONSTRUCTION_FILE, settings.intra_op_threads)
        x = np.zeros((1, pre.channels, pre.size, pre.size), np.float32)
        if reconstructor.run(x).shape != x.shape:
            raise BundleError(f"{RECONSTRUCTION_FILE} does not map {list(x.shape)} to the same shape")
    return LoadedModel(
        manifest,
        path,
        runner,
        pre,
        calibration,
        reconstructor=reconstructor,
        roi=load_roi(path, manifest, pre, tiling),
        tiling=tiling,
    )


def load_tiling(manifest: Manifest, pre: Preprocessing) -> Tiling | None:
    """The bundle's tiling; its tiles must be what the model takes."""
    if not manifest.tiling:
        return None
    tiling = Tiling.from_dict(manifest.tiling)
    if tiling.tile != pre.size:
        raise ValueError(
            f"tiling.tile {tiling.tile} != preprocessing.size {pre.size}: tiles are model inputs"
        )
    return tiling


def load_roi(path: Path, manifest: Manifest, pre: Preprocessing, tiling: Tiling | None) -> np.ndarray | None:
    """The bundle's ROI mask on its heatmap grid; its file must be one the manifest vouches for."""
    if not manifest.roi:
        return None
    name = manifest.roi.get("file")
    if name not in manifest.files:
        raise BundleError(f"manifest roi names {name!r}, which is not among its checksummed files")
    try:
        return mask_from_image(path / name, pre, tiling)
    except RoiError as exc:
        raise BundleError(f"{path / name}: {exc}") from None


def bundle_key(path: Path, model_dir: Path) -> str:
    """How responses name a bundle: its folder under the model directory (``.`` for the directory
    itself), never the server's absolute path (``/readyz`` answers without an API key)."""
    return path.relative_to(model_dir).as_posix()


def public_reason(reason: str, model_dir: Path, bundle: Path | None = None) -> str:
    """A refusal's reason as responses show it, without the server's paths: the model directory, as
    configured or resolved, reads ``MNEMO_MODEL_DIR``, the bundle's resolved path (ONNX Runtime resolves
    symlinks) ``MNEMO_MODEL_DIR/<its folder>``, and any other absolute path (an external-data file
    elsewhere) ``<path>``. The log keeps the full text."""
    names = {str(model_dir): "MNEMO_MODEL_DIR", str(model_dir.resolve()): "MNEMO_MODEL_DIR"}
    if bundle is not None and (key := bundle_key(bundle, model_dir)) != ".":
        names[str(bundle.resolve())] = f"MNEMO_MODEL_DIR/{key}"
    for prefix, name in sorted(names.items(), key=lambda item: -len(item[0])):  # a bundle's path first
        reason = re.sub(re.escape(prefix) + r"(?![\w.-])", name.replace("\\", "\\\\"), reason)
    return ABSOLUTE_PATH.sub("<path>", reason)


def model_dir_of(settings: Settings) -> Path:
    """The model directory, made absolute once, so bundle paths and their keys agree however it was given."""
    return Path(settings.model_dir).absolute()


def load_all(settings: Settings, current: dict[str, LoadedModel]) -> tuple[dict[str, LoadedModel], dict]:
    """Load every bundle; returns the new name -> model map and bundle key -> failure reason."""
    model_dir = model_dir_of(settings)
    by_path = {m.path: m for m in current.values()}
    models: dict[str, LoadedModel] = {}
    failed: dict[str, str] = {}
    try:
        paths = discover(model_dir)
    except BundleError as exc:
        logger.error("no model bundles: %s", exc)
        return {}, {".": public_reason(str(exc), model_dir)}
    for path in paths:
        try:
            model = load_bundle(path, settings, by_path.get(path))
            if model.name in models:
                raise BundleError(
                    f"model name {model.name!r} is already served from {models[model.name].path}"
                )
        except Exception as exc:  # one bad bundle must never stop the others
            failed[bundle_key(path, model_dir)] = public_reason(str(exc), model_dir, path)
            logger.error("refused model bundle %s: %s", path, exc)
            continue
        models[model.name] = model
    return models, failed


def freeze_long_lived() -> None:
    """Put what exists once the models are loaded (modules, the app, the models) out of the garbage
    collector's sight (``gc.freeze``), so that its collections scan only what requests make: at c=64 on
    the small brick model the collector's cost fell from about 73 to 43 µs a request. ``ModelStore``
    unfreezes it all when a reload retires a model, so that the retired model (which its cancelled tasks
    keep in reference cycles) can be collected: collection costs what it did before, never a leak."""
    gc.collect()
    gc.freeze()


class ModelStore:
    """The served models by name; reloads are serialised and swap the whole map at once."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, LoadedModel] = {}
        self.last_report = ReloadReport()
        self.started = False  # the start-up load has finished
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        """The start-up load has finished and, per ``ready_requires``, every bundle of the model directory
        is served (``all``: none failed, unless its previous version still serves) or at least one is
        (``any``). Either way, no model at all is never ready."""
        if not (self.started and self.models):
            return False
        if self.settings.ready_requires == "any":
            return True
        served = {self._key(model) for model in self.models.values()}
        return all(key in served for key in self.last_report.failed)

    def get(self, name: str) -> LoadedModel | None:
        return self.models.get(name)

    def _key(self, model: LoadedModel) -> str:
        return bundle_key(model.path, model_dir_of(self.settings))

    async def load_at_start(self) -> ReloadReport:
        report = await self.reload()
        self.started = True
        self.metrics.ready.set(self.ready)
        freeze_long_lived()
        return report

    async def reload(self) -> ReloadReport:
        async with self._lock:
            fresh, failed = await asyncio.to_thread(load_all, self.settings, dict(self.models))
            old = self.models
            kept = {n: m for n, m in old.items() if self._key(m) in failed and n not in fresh}
            self.models = {**kept, **fresh}
            retired = [m for n, m in old.items() if self.models.get(n) is not m]
            for model in retired:  # before the new versions register theirs, which may carry the same labels
                self.metrics.drop_model(model.info())
            report = ReloadReport(failed=failed, kept=sorted(kept))
            for name, model in fresh.items():
                if old.get(name) is model:
                    report.unchanged.append(name)
                else:
                    self._start(model)
                    report.loaded.append(name)
            report.removed = sorted(m.name for m in retired if m.name not in self.models)
            self.last_report = report
        self.metrics.errors.labels("bundle_load").inc(len(failed))
        for name in report.kept:
            logger.warning("reload of %s failed; still serving version %s", name, kept[name].manifest.version)
        for model in retired:
            await self._stop(model)
        if retired:
            gc.unfreeze()  # see freeze_long_lived
            del retired, old  # the retired models' last references: their sessions go now
            gc.collect()
            release_free_memory()  # their runtime's freed memory back to the system (40 brick copies
            # loaded, 39 removed: 259 MB resident without it, 106 MB with it; 59 MB before any)
        self.metrics.ready.set(self.ready)
        return report

    async def close(self) -> None:
        models, self.models = list(self.models.values()), {}
        for model in models:
            self.metrics.drop_model(model.info())
            await self._stop(model)

    def _start(self, model: LoadedModel) -> None:
        s = self.settings
        model.metrics = self.metrics.for_model(model.name)
        model.batcher = DynamicBatcher(
            model.runner.run,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
            max_queue_wait_s=s.max_queue_wait_s,
            observer=model.metrics,
            name=model.name,
        )
        model.batcher.start()
        self.metrics.set_model(model.info())
        threads = getattr(model.runner, "threads", None)  # ONNX Runtime's choice (auto: by the model's cost)
        engine = ""
        if threads is not None:
            engine = ", all cores" if threads == 0 else f", {threads} thread{'s' if threads > 1 else ''}"
            engine += ", spinning" if model.runner.spinning else ""
        logger.info(
            "loaded model %s version %s from %s (%s on %s%s)",
            model.name, model.manifest.version, model.path, model.runner.backend, model.runner.device, engine,
        )  # fmt: skip

    async def _stop(self, model: LoadedModel) -> None:
        if model.batcher is not None:
            await model.batcher.close()
