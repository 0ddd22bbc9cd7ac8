"""A run directory: ``train_run`` writes one, ``evaluate_run`` and ``export_run`` read it back.

It holds everything needed to evaluate or export later without the training data:

    config.yaml        the run's full config (defaults filled in)
    best.pt, last.pt   training checkpoints (resume with --resume)
    model.pt           the final weights (best epoch, plus what ``after_fit`` set: DAAD+'s score scaling)
    samples.pt         a few held-out good images, for the export's self-check
    roi.png            the region-of-interest mask (``data.roi``), when the run has one
    history.json       per-epoch losses and wall seconds (training and validation)
    calibration.json   threshold, how it was chosen, normal-score quantiles (mnemo.calibration)
    report.json        data summary, metrics, threshold behaviour on the test split
    plots/             ROC, PR, score histogram, example grid
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import shutil
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mnemo import models
from mnemo.bundle import TORCHSCRIPT_FILE, Manifest, read_manifest
from mnemo.calibration import Calibration, is_anomalous, too_few_for_rate
from mnemo.imaging import Preprocessing
from mnemo.models.base import AnomalyModel
from mnemo.roi import ROI_FILE, RoiError, fit_mask, mask_from_image
from mnemo.tiling import Tiling
from mnemo.training import config as run_config
from mnemo.training import datasets, distributed
from mnemo.training.batches import TensorBatches
from mnemo.training.calibration import calibrate
from mnemo.training.evaluate import (
    ScoredSet,
    compute_metrics,
    images_of,
    score_dataset,
    score_frames,
    within_roi,
)
from mnemo.training.export import export_bundle
from mnemo.training.plots import write_plots
from mnemo.training.trainer import TrainState, fit, pick_device, seed_everything

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.pt"
SAMPLES_FILE = "samples.pt"
HISTORY_FILE = "history.json"
CALIBRATION_FILE = "calibration.json"
REPORT_FILE = "report.json"
PLOTS_DIR = "plots"
EXPORT_SAMPLES = 8
SCORING_BATCH_VALUES = 1 << 20  # input values (batch × C × H × W) of a batch that keeps no gradient


# ------------------------------------------------------------------------------------------ building


def load_splits(
    data: run_config.DataConfig, prep: Preprocessing, tiling: Tiling | None = None
) -> datasets.Splits:
    if not data.path:
        raise ValueError("no dataset: set data.path in the config or pass --data DIR")
    if data.kind == "idx":
        return datasets.idx_splits(
            data.path,
            data.protocol,
            data.target_class,
            prep,
            val_fraction=data.val_fraction,
            split_seed=data.split_seed,
        )
    if data.kind == "folder":
        return datasets.folder_splits(
            data.path,
            prep,
            val_fraction=data.val_fraction,
            split_seed=data.split_seed,
            flips=data.flips,
            tiling=tiling,
        )
    if tiling is not None:
        raise ValueError("data.tiled needs a folder dataset (IDX images are the model's size already)")
    raise ValueError(f"data.kind must be 'folder' or 'idx', got {data.kind!r}")


def loader(dataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator
    )


def scoring_batch_size(model: AnomalyModel, train_batch: int) -> int:
    """Batch size of the passes that keep no gradient (scoring the validation and test splits,
    ``after_fit``): as many images as about a million input values, at most 256, and never fewer than
    the training batch (which may be larger); tiled data scores frame by frame instead. Paper 003's
    batch of 8 otherwise scored one-class MNIST's 10 000 test images in 1 250 small passes (2.3x slower
    than batches of 256). Neither scores nor ``after_fit``'s statistics depend on the batch
    (tests/test_models_contract.py), so only the time changes. The validation *loss* keeps the training
    batch: a contrastive loss (AnoMem's) depends on its batch."""
    values = model.config.in_channels * model.config.image_size**2
    return max(train_batch, min(256, SCORING_BATCH_VALUES // values))


def batches(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    *,
    train: bool = False,
    seed: int = 0,
    world: distributed.World | None = None,
) -> TensorBatches | DataLoader:
    """A split's image batches: sliced from one in-memory tensor when the split has one (IDX arrays,
    folders small enough to cache: no per-item Python, issue 16), else streamed by a DataLoader.
    ``train`` shuffles and applies the dataset's flips; otherwise images come as the data has them."""
    rank, size = (world.rank, world.size) if train and world else (0, 1)  # only training is sharded
    images = datasets.images_tensor(dataset)
    if images is None:
        if train and size > 1:
            sampler = DistributedSampler(dataset, size, rank, shuffle=True, seed=seed, drop_last=True)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
        if train:
            return loader(dataset, batch_size, workers, shuffle=True, seed=seed)
        return loader(unaugmented(dataset), batch_size, workers)
    flips = train and getattr(dataset, "flips", False)
    return TensorBatches(images, batch_size, shuffle=train, flips=flips, seed=seed, rank=rank, world=size)


def unaugmented(dataset: Dataset) -> Dataset:
    """The training images as the data has them: a copy with the training flips off, for ``after_fit``
    (per-position statistics of flipped parts would smear a fixture's layout onto its mirror image)."""
    if not getattr(dataset, "flips", False):
        return dataset
    plain = copy.copy(dataset)
    plain.flips = False
    return plain


def preprocessing_of(model: AnomalyModel, resize: str) -> Preprocessing:
    return Preprocessing.from_model_config(model.config, resize=resize)


def tiling_of(model: AnomalyModel, data: run_config.DataConfig) -> Tiling | None:
    """The run's tiling (``data.tiled``): tiles of the model's input size."""
    return Tiling(model.config.image_size, data.tile_overlap, data.tile_scale) if data.tiled else None


def score_split(
    model: AnomalyModel,
    split: Dataset,
    tiling: Tiling | None,
    images: Iterable,
    device: torch.device,
    progress: bool,
) -> ScoredSet:
    """A split scored image by image from ``images`` (its batches), or, tiled, frame by frame (each
    frame's tiles merged as the service merges them)."""
    if tiling is None:
        return score_dataset(model, images, device, progress)
    return score_frames(model, getattr(split, "frames", split), tiling, device, progress=progress)


def judged_in_roi(
    scored: ScoredSet, roi: Path | None, prep: Preprocessing, tiling: Tiling | None
) -> ScoredSet:
    """``scored`` as a bundle with the ``roi`` mask PNG judges it (``evaluate.within_roi``)."""
    if roi is None:
        return scored
    return within_roi(scored, fit_mask(mask_from_image(roi, prep, tiling), scored.heatmaps.shape[1:]))


def keep_roi(
    data: run_config.DataConfig, out: Path, prep: Preprocessing, tiling: Tiling | None
) -> Path | None:
    """The run's ROI mask, checked on the run's own grid (a small ROI must survive the resize) and copied
    into the run directory (export reads it from there)."""
    if not data.roi:
        return None
    source = Path(data.roi)
    try:
        mask_from_image(source, prep, tiling)
    except RoiError as exc:
        raise ValueError(f"data.roi {source}: {exc}") from None
    shutil.copyfile(source, out / ROI_FILE)
    return out / ROI_FILE


def run_roi(run_dir: Path) -> Path | None:
    return run_dir / ROI_FILE if (run_dir / ROI_FILE).is_file() else None


# --------------------------------------------------------------------------------------------- files


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> AnomalyModel:
    """The final model of a run (``model.pt``)."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished `mnemo train` run?")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = models.create(ckpt["model_name"], **ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def save_model(model: AnomalyModel, path: Path) -> None:
    torch.save(
        {
            "model_name": model.model_name,
            "model_config": dataclasses.asdict(model.config),
            "model": model.state_dict(),
        },
        path,
    )


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# -------------------------------------------------------------------------------------------- train


def train_run(cfg: run_config.RunConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train, let the model finish on its training images (``after_fit``), calibrate, evaluate; returns
    the run directory."""
    out = cfg.output_path
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    world = distributed.init(pick_device(cfg.device))  # a world of one unless torchrun started this
    device = world.device
    cfg = with_image_channels(cfg)
    model = models.create(cfg.model, **cfg.model_config)
    if world.size > 1:  # same initial weights everywhere (broadcast in fit), own training randomness
        torch.manual_seed(cfg.seed + world.rank)
    prep = preprocessing_of(model, cfg.data.resize)
    tiling = tiling_of(model, cfg.data)
    roi = keep_roi(cfg.data, out, prep, tiling) if world.is_main else None
    splits = load_splits(cfg.data, prep, tiling)
    optim = run_config.resolve_optim(cfg.optim, model.config)
    cfg = dataclasses.replace(cfg, optim=optim)
    if world.is_main:
        run_config.save(cfg, out / CONFIG_FILE)
    workers = cfg.data.num_workers
    train_loader = batches(splits.train, optim.batch_size, workers, train=True, seed=cfg.seed, world=world)
    val_loader = batches(splits.val, optim.batch_size, workers)
    ranks = f", {world.size} processes" if world.size > 1 else ""
    if world.is_main:
        print(f"training {cfg.model} on {device}{ranks} → {out}  ({json.dumps(splits.summary, default=str)})")
    state = fit(model, train_loader, val_loader, optim, device, out, cfg.to_dict(), resume, progress)
    if not world.is_main:  # rank 0 finishes the run alone; the others wait to leave the group together
        distributed.barrier()
        distributed.finish()
        return out
    write_json(out / HISTORY_FILE, state.history)

    scoring_batch = scoring_batch_size(model, optim.batch_size)
    model.after_fit(images_of(b) for b in batches(splits.train, scoring_batch, workers))
    save_model(model, out / MODEL_FILE)
    torch.save(next(iter(loader(splits.val, EXPORT_SAMPLES, 0)))["image"], out / SAMPLES_FILE)
    val, test = score_val_and_test(
        model,
        splits,
        roi,
        prep,
        tiling,
        batch_size=scoring_batch,
        workers=workers,
        device=device,
        progress=progress,
    )
    calibration = calibrate(
        val.scores,
        false_alarm_rate=cfg.false_alarm_rate,
        scores=None if test is None else test.scores,
        labels=None if test is None else test.labels,
        normal_heatmaps=val.heatmaps if val.valid is None else val.heatmaps[:, val.valid],
        pixel_false_alarm_rate=cfg.pixel_false_alarm_rate,
    )
    write_json(out / CALIBRATION_FILE, calibration.to_dict())
    if warning := too_few_for_rate(calibration.n, cfg.false_alarm_rate):
        print(f"warning: {warning} (add training images or raise data.val_fraction)", file=sys.stderr)
    report = run_report(cfg, model, splits, state, world, warning)
    if test is not None:
        report["test"] = evaluation_report(test, calibration)
        write_plots(model, splits.test, test, calibration, out / PLOTS_DIR, device, tiling)
    write_json(out / REPORT_FILE, report)
    print(summary_line(report, calibration))
    distributed.barrier()  # (a world of one: nothing) the group ends on every rank at once
    distributed.finish()
    return out


def score_val_and_test(
    model: AnomalyModel,
    splits: datasets.Splits,
    roi: Path | None,
    prep: Preprocessing,
    tiling: Tiling | None,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool,
) -> tuple[ScoredSet, ScoredSet | None]:
    """The validation split's and (when there is one) the test split's scores and heatmaps, each judged
    inside the region of interest."""
    val_images = batches(splits.val, batch_size, workers)
    val = judged_in_roi(
        score_split(model, splits.val, tiling, val_images, device, progress), roi, prep, tiling
    )
    if not splits.test:
        return val, None
    test_images = loader(splits.test, batch_size, workers)
    test = score_split(model, splits.test, tiling, test_images, device, progress)
    return val, judged_in_roi(test, roi, prep, tiling)


def run_report(
    cfg: run_config.RunConfig,
    model: AnomalyModel,
    splits: datasets.Splits,
    state: TrainState,
    world: distributed.World,
    warning: str | None,
) -> dict[str, Any]:
    """report.json's training half: what ran, how long, why it stopped (the test metrics join it)."""
    return {
        "model": cfg.model,
        "data": splits.summary,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "steps": state.steps,
        "processes": world.size,
        "stop_reason": state.stop_reason,
        "train_seconds": state.train_seconds,
        "best_val_loss": state.best_val,
        "device": str(world.device),
        # every field, defaults included: config.yaml holds only what was set, and a default may change
        "model_config": dataclasses.asdict(model.config),
        "calibration_warning": warning,
    }


def with_image_channels(cfg: run_config.RunConfig) -> run_config.RunConfig:
    """Fill ``in_channels`` from a folder's own images (1 for grayscale files, else 3) unless the config
    sets it (``channels_filled``)."""
    if cfg.data.kind != "folder" or not cfg.data.path or "in_channels" in cfg.model_config:
        return cfg
    models.make_config(cfg.model, **cfg.model_config)  # an unknown model fails before the images are read
    channels = datasets.image_channels(cfg.data.path)
    return dataclasses.replace(cfg, model_config=channels_filled(cfg.model, cfg.model_config, channels))


def channels_filled(model: str, model_config: dict[str, Any], channels: int) -> dict[str, Any]:
    """``model_config`` with ``in_channels: channels``, and a per-channel mean/std (set or default) of
    another length cut to its first value (broadcast)."""
    defaults = models.make_config(model, **model_config)
    fitted: dict[str, Any] = {"in_channels": channels}
    for key in ("mean", "std"):
        values = tuple(getattr(defaults, key))
        if len(values) not in (1, channels):
            fitted[key] = values[:1]
    return {**model_config, **fitted}


# ----------------------------------------------------------------------------------------- evaluate


@dataclasses.dataclass(frozen=True)
class RunTestSplit:
    """A run's data set (or another path) split as its model sees it: what scoring its labelled test split
    takes, so ``mnemo evaluate`` and the benchmarks that rescore kept runs score it one way."""

    run_dir: Path
    splits: datasets.Splits
    tiling: Tiling | None
    prep: Preprocessing
    batch: int

    @classmethod
    def load(cls, run_dir: Path, model: AnomalyModel, data: str | None = None) -> RunTestSplit:
        cfg = run_config.load(run_dir / CONFIG_FILE, [f"data.path={data}"] if data else [])
        tiling, prep = tiling_of(model, cfg.data), preprocessing_of(model, cfg.data.resize)
        splits = load_splits(cfg.data, prep, tiling)
        if splits.test is None:
            raise ValueError(f"{cfg.data.path} has no labelled test split to evaluate on")
        batch = scoring_batch_size(model, run_config.resolve_optim(cfg.optim, model.config).batch_size)
        return cls(run_dir, splits, tiling, prep, batch)

    def score(self, model: AnomalyModel, device: torch.device, progress: bool) -> ScoredSet:
        """The test split scored by ``model``, judged inside the run's region of interest if it has one."""
        test = self.splits.test
        scored = score_split(model, test, self.tiling, loader(test, self.batch, 0), device, progress)
        return judged_in_roi(scored, run_roi(self.run_dir), self.prep, self.tiling)


def evaluate_run(
    run_dir: Path,
    data: str | None = None,
    out: Path | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Score the labelled test split of the run's dataset (or of ``data``) with the run's threshold;
    writes the report and plots to ``out`` (default ``<run>/eval``) and returns it."""
    run_dir = Path(run_dir)
    torch_device = pick_device(device)
    model = load_model(run_dir, torch_device)
    test = RunTestSplit.load(run_dir, model, data)
    scored = test.score(model, torch_device, progress)
    calibration = Calibration.from_dict(read_json(run_dir / CALIBRATION_FILE))
    out = Path(out) if out else run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    report = {"data": test.splits.summary, "test": evaluation_report(scored, calibration)}
    write_json(out / REPORT_FILE, report)
    write_plots(model, test.splits.test, scored, calibration, out / PLOTS_DIR, torch_device, test.tiling)
    print(summary_line(report, calibration))
    return out


def evaluation_report(scored: ScoredSet, calibration: Calibration) -> dict[str, Any]:
    """The papers' metrics plus how the calibrated threshold behaves on this labelled set."""
    report = compute_metrics(scored)
    flagged = is_anomalous(scored.scores, calibration.threshold)
    normal, anomalous = scored.labels == 0, scored.labels == 1
    report["at_threshold"] = {
        "threshold": calibration.threshold,
        "false_alarm_rate": float(flagged[normal].mean()) if normal.any() else None,
        "detection_rate": float(flagged[anomalous].mean()) if anomalous.any() else None,
    }
    return report


def summary_line(report: dict[str, Any], calibration: Calibration) -> str:
    test = report.get("test", {})
    image = test.get("image")
    metrics = (
        f"AUROC {image['auroc']:.4f}  AUPRC {image['auprc']:.4f}  F1 {image['f1']:.4f}"
        if image
        else _why_no_metrics(test)
    )
    pixel = test.get("pixel")
    if pixel:
        metrics += f"  pixel AUROC {pixel['auroc']:.4f}  PRO {pixel['pro']:.4f}"
    return (
        f"done: {metrics}  threshold {calibration.threshold:.6g} ({calibration.method} {calibration.target})"
    )


def _why_no_metrics(test: dict[str, Any]) -> str:
    """A test split of one class has no AUROC; say which class is missing and what the threshold did."""
    if not test.get("n_images"):
        return "no test"
    at = test["at_threshold"]
    if at["detection_rate"] is not None:
        return (
            f"no AUROC: the test split has no good images (add test/good); "
            f"{at['detection_rate']:.0%} of its {test['n_anomalous']} anomalous ones flagged"
        )
    return (
        f"no AUROC: the test split has no anomalous images (add test/<defect>); "
        f"{at['false_alarm_rate']:.0%} of its {test['n_images']} good ones flagged"
    )


# ------------------------------------------------------------------------------------------- export


def export_run(
    run_dir: Path,
    out: str | Path,
    *,
    name: str | None = None,
    version: str | None = None,
    threshold: str = "false_alarm_rate",
    atol: float = 1e-4,
) -> Manifest:
    """Export the run's model as a verified bundle in ``out``; ``name`` defaults to the run's model name,
    ``version`` to a UTC timestamp, ``threshold`` is as ``choose_threshold`` takes it."""
    run_dir = Path(run_dir)
    model = load_model(run_dir)
    cfg = run_config.load(run_dir / CONFIG_FILE)
    report = read_json(run_dir / REPORT_FILE)
    return export_bundle(
        model,
        out,
        name=name or cfg.model,
        version=version or dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S"),
        preprocessing=preprocessing_of(model, cfg.data.resize).to_dict(),
        calibration=choose_threshold(read_json(run_dir / CALIBRATION_FILE), threshold),
        samples=torch.load(run_dir / SAMPLES_FILE),
        training={"run_config": cfg.to_dict(), "data": report.get("data"), "epochs": report.get("epochs")},
        metrics=report.get("test", {}),
        tiling=None if (tiling := tiling_of(model, cfg.data)) is None else tiling.to_dict(),
        roi=run_roi(run_dir),
        atol=atol,
    )


def export_from_bundle(
    bundle: Path, out: str | Path, *, name: str | None = None, version: str | None = None, atol: float = 1e-4
) -> Manifest:
    """Export an existing bundle again with this Mnemo's exporter (e.g. to add ``reconstruction.onnx``),
    its weights read back from ``model.ts``, its calibration and facts kept. Verified on random inputs
    in the model's normalised range, as no training images come with a bundle."""
    manifest = read_manifest(bundle)
    model = models.create(manifest.architecture, **manifest.model_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.load(str(Path(bundle) / TORCHSCRIPT_FILE), map_location="cpu")
    # strict=False: an older exporter may have traced buffers this code no longer keeps (a blur kernel);
    # every weight this code needs must be there
    missing = model.load_state_dict(traced.state_dict(), strict=False).missing_keys
    if missing:
        raise ValueError(f"{bundle}: model.ts lacks {', '.join(missing)}; cannot export it again")
    pre = Preprocessing.from_dict(manifest.preprocessing)
    shape = (EXPORT_SAMPLES, pre.channels, pre.size, pre.size)
    pixels = torch.rand(shape, generator=torch.Generator().manual_seed(0))  # 0…1, as decoded images are
    samples = (pixels - torch.tensor(pre.mean).view(1, -1, 1, 1)) / torch.tensor(pre.std).view(1, -1, 1, 1)
    return export_bundle(
        model.eval(),
        out,
        name=name or manifest.name,
        version=version or dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S"),
        preprocessing=manifest.preprocessing,
        calibration=manifest.calibration,
        samples=samples,
        training={**manifest.training, "exported_again_from": manifest.version},
        metrics=manifest.metrics,
        tiling=manifest.tiling,
        roi=Path(bundle) / manifest.roi["file"] if manifest.roi else None,
        atol=atol,
    )


def choose_threshold(calibration: dict[str, Any], choice: str) -> dict[str, Any]:
    """The calibration record with the verdict threshold to ship (``mnemo export --threshold``)."""
    if choice == "false_alarm_rate":
        return calibration
    if choice == "best_f1":
        if calibration.get("best_f1_threshold") is None:
            raise ValueError("--threshold best_f1: the run had no labelled test split to choose it on")
        return {**calibration, "threshold": calibration["best_f1_threshold"], "method": "best_f1"}
    try:
        value = float(choice)
    except ValueError:
        raise ValueError(
            f"--threshold must be false_alarm_rate, best_f1 or a number, got {choice!r}"
        ) from None
    return {**calibration, "threshold": value, "method": "manual"}
