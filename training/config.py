"""One run = one config file (YAML or TOML), saved next to the results and overridable from the CLI.

    model: memorizer
    model_config: {memory_size: 8}
    data: {kind: idx, path: ../shared/data/mnist, protocol: roco, target_class: 3}
    optim: {lr: 0.001, batch_size: 256, max_epochs: 100, patience: 10}

Defaults are the papers' (000/001 §4): Adam 1e-3, batch 256, early stopping with patience 10 on the
validation loss, a 10 % validation split drawn with seed 2022. A model whose paper trains differently
declares ``paper_optim`` on its config class (DAAD: lr 1e-4, batch 8); those fill the fields left unset.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mnemo.calibration import DEFAULT_PIXEL_FALSE_ALARM_RATE
from mnemo.config_values import coerce


@dataclass
class DataConfig:
    kind: str = "folder"  # "folder" (MVTec AD layout or a folder of good images) or "idx" (MNIST-style)
    path: str = ""  # dataset root directory
    protocol: str = "roco"  # idx: "roco" (class held out as anomaly) or "one_class" (class is the normal one)
    target_class: int = 0  # idx: the anomalous class (roco) or the normal class (one_class)
    val_fraction: float = 0.1  # share of the good training images held out for early stopping + calibration
    split_seed: int = 2022  # seed of the validation split (papers 000/001)
    resize: str = "resize"  # folder: "resize" (stretch) or "center_crop"
    flips: bool = False  # random horizontal/vertical flips while training (DAAD uses them)
    num_workers: int = 0  # DataLoader worker processes
    tiled: bool = False  # folder: score tile by tile (mnemo.tiling): tiles of image_size at tile_scale
    tile_overlap: int = 16  # tiled: pixels neighbouring tiles share (blended in the heatmap)
    tile_scale: float = 1.0  # tiled: working resolution / the images' own (1 = every camera pixel)
    roi: str = ""  # folder: a mask PNG of the frame (white counts): scored and calibrated inside (mnemo.roi)


SCHEDULES = ("constant", "cosine")


@dataclass
class OptimConfig:
    lr: float | None = None  # Adam learning rate; None = the model's paper default (1e-3; DAAD 1e-4)
    batch_size: int | None = None  # None = the model's paper default (256; DAAD 8)
    max_epochs: int = 100
    max_steps: int = 0  # cap on optimizer steps over the whole run; 0 = none (compares capped protocols)
    patience: int = 10  # early stopping: epochs without a better validation loss
    weight_decay: float = 0.0
    max_steps_per_epoch: int = 0  # 0 = full epochs; >0 caps an epoch (quick runs, smoke tests)
    max_minutes: float = 0.0  # time budget of the training loop; 0 = none (Ctrl-C also stops cleanly)
    schedule: str = "constant"  # learning rate: "constant" (papers) or "cosine" (to 0 at the epoch/time cap)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.max_steps < 0:
            raise ValueError(f"optim.max_steps must be >= 0 (0 = no cap), got {self.max_steps}")


FALLBACK_OPTIM = {"lr": 1e-3, "batch_size": 256}  # papers 000/001 §4


def resolve_optim(optim: OptimConfig, model_config: Any) -> OptimConfig:
    """Fill unset learning rate / batch size from the model's ``paper_optim``, then the papers 000/001."""
    paper = {**FALLBACK_OPTIM, **getattr(model_config, "paper_optim", {})}
    filled = {k: paper[k] for k in FALLBACK_OPTIM if getattr(optim, k) is None}
    return dataclasses.replace(optim, **filled)


@dataclass
class RunConfig:
    model: str = "memae"
    model_config: dict[str, Any] = field(default_factory=dict)  # overrides of the model's config dataclass
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 2022  # weights, shuffling and training-time randomness
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
    out_dir: str = "runs/{model}"  # {model} is replaced by the model name
    false_alarm_rate: float = 0.01  # calibration: target share of good images flagged anomalous
    pixel_false_alarm_rate: float = (
        DEFAULT_PIXEL_FALSE_ALARM_RATE  # share of good pixels above the region level
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def output_path(self) -> Path:
        return Path(self.out_dir.format(model=self.model))


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig, rejecting unknown keys with the list of valid ones."""
    raw = dict(raw)
    sections = {"data": DataConfig, "optim": OptimConfig}
    for key, cls in sections.items():
        raw[key] = _build(cls, raw.get(key) or {}, key)
    return _build(RunConfig, raw, "config")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    coerced = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            coerced[f.name] = coerce(values[f.name], f.type, f"{where}.{f.name}")
    return cls(**coerced)


RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "restore"  # what `mnemo train --data DIR` trains when given no config and no --model


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``training/recipes/`` (run configs without a data path)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown recipe {name!r}; shipped recipes: {', '.join(list_recipes())}")
    return path


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML/TOML file (or start from defaults) and apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else (yaml.safe_load(text) or {})
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``optim.lr=1e-4`` → raw["optim"]["lr"] = 0.0001 (values parsed as YAML scalars/lists)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override must look like section.key=value, got {item!r}")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)


def save(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
