"""The accuracy results as markdown: ours beside the papers', class by class, mean ± std over seeds.

One section per (dataset, protocol, epoch cap). The synthetic textures have no paper numbers: their
tables give image AUROC, pixel AUROC and PRO per model instead. Per class, "ours" is the mean ± sample std
over the seeds that finished (the count is shown when it is not 3). The AVG row is, per seed, the mean over
the classes that seed finished, then mean ± std over seeds; a partial row says how many classes it covers.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mnemo.benchmarks import paper_tables
from mnemo.benchmarks.accuracy_plan import (
    BANK,
    FULL_EPOCHS,
    PAPER_MAX_EPOCHS,
    ROCO_MODELS,
    SEEDS,
    TEXTURE_DATASET,
)
from mnemo.training.synthetic import TEXTURES

METRICS = {
    "roco": ("auroc", "auprc", "f1"),
    "one_class": ("auroc",),
    "synthetic": ("auroc", "pixel_auroc", "pro"),
    "real": ("auroc", "auprc"),
}
MODEL_ORDER = (
    *("ae", "memae", "memorizer", "rftm", "daad", "daad_plus", "anomem", "restore"),
    *(m + BANK for m in ROCO_MODELS),
)
# Measured outside this benchmark on the same elpv-mono test cells, ~15 min of 2 CPU cores each (issue
# "real defects"): what a user gets elsewhere, for scale. Image AUROC %.
REAL_REFERENCES = {
    "elpv-mono": [
        ("a 40-line plain conv AE (MSE, 10 min)", "79.6"),
        ("mnemo daad before the restore recipe (widths 16/32/64, 22 epochs)", "73.5"),
        ("mnemo memae before (conv backbone, 17 epochs)", "72.5"),
        ("anomalib 2.7 Ganomaly / Draem, same cap, all cell types", "≈72 / ≈69"),
    ]
}


def write_markdown(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results))


def render(results: dict[str, Any]) -> str:
    records = results.get("records", [])
    lines = ["# Accuracy benchmarks", ""]
    lines += _provenance(results)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["protocol"], r["max_epochs"])].append(r)
    for (dataset, protocol, cap), group in sorted(groups.items()):
        lines += _section(dataset, protocol, cap, group)
    return "\n".join(lines) + "\n"


def _provenance(results: dict[str, Any]) -> list[str]:
    """Every record carries its own commit; a file resumed across commits lists them all."""
    m = results.get("machine", {})
    commits = sorted({_short(r["commit"]) for r in results["records"] if "commit" in r}) or ["?"]
    return [
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}; "
        f"commits {', '.join(f'`{c}`' for c in commits)} (each record's own: see the JSON). Numbers in %. "
        "Ours: mean ± std over the seeds run; paper: as published. "
        "Regenerate: `mnemo bench accuracy --help`.",
        "",
    ]


def _short(commit: str) -> str:
    return commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")


def _section(dataset: str, protocol: str, cap: int, records: list[dict]) -> list[str]:
    seeds = sorted({r["seed"] for r in records})
    title = f"## {dataset}, {protocol}"
    if cap < FULL_EPOCHS.get(protocol, PAPER_MAX_EPOCHS):
        title += f" — CAPPED at {cap} epochs (not the full protocol: early stopping, patience 10)"
    papers = f" (papers: {', '.join(map(str, SEEDS))})" if protocol in ("roco", "one_class") else ""
    lines = [title, "", f"Seeds: {', '.join(map(str, seeds))}{papers}.", ""]
    models = [m for m in MODEL_ORDER if any(r["model"] == m for r in records)]
    epochs = {m: [r["epochs"] for r in records if r["model"] == m] for m in models}
    lines += [
        "Epochs trained (min–max): "
        + ", ".join(f"{m} {min(e)}–{max(e)}" for m, e in epochs.items())
        + "; minutes per cell (mean): "
        + ", ".join(
            f"{m} {np.mean([r['seconds'] for r in records if r['model'] == m]) / 60:.1f}" for m in models
        ),
        "",
    ]
    for metric in METRICS[protocol]:
        lines += _metric_table(dataset, protocol, metric, models, records)
    if protocol == "real":
        lines += _real_notes(dataset, models, records)
    return lines


def _real_notes(dataset: str, models: list[str], records: list[dict]) -> list[str]:
    """Recipe and training time per model, and the reference points measured elsewhere."""
    lines = ["| model | recipe | train minutes (mean) | stopped by |", "| --- | --- | --- | --- |"]
    for m in models:
        mine = [r for r in records if r["model"] == m]
        minutes = np.mean([r.get("train_seconds") or r["seconds"] for r in mine]) / 60
        stops = ", ".join(sorted({str(r.get("stop_reason")) for r in mine}))
        lines.append(f"| {m} | {mine[0].get('recipe', '?')} | {minutes:.1f} | {stops} |")
    refs = REAL_REFERENCES.get(dataset, [])
    if refs:
        lines += ["", "Reference points (image AUROC %, measured outside this benchmark, same cells):", ""]
        lines += [f"- {name}: {value}" for name, value in refs]
    return [*lines, ""]


def _metric_table(
    dataset: str, protocol: str, metric: str, models: list[str], records: list[dict]
) -> list[str]:
    """One row per class, ours (and the paper's, where a paper has the cell) per model, then the average.
    A ``+bank`` model is ours alone: no paper scores with a latent bank."""
    protocol_has_paper = protocol in ("roco", "one_class")
    names = TEXTURES if dataset == TEXTURE_DATASET else paper_tables.CLASS_NAMES.get(dataset, [dataset])

    def with_paper(model: str) -> bool:
        return protocol_has_paper and not model.endswith(BANK)

    header = ["class"]
    for m in models:
        if not protocol_has_paper:
            header.append(m)
        else:
            header += [f"{m} ours", f"{m} paper"] if with_paper(m) else [f"{m} ours"]
    title = metric.upper().replace("_", " ")
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    classes = sorted({r["target_class"] for r in records})
    for c in classes:
        row = [names[c] if c < len(names) else str(c)]
        for m in models:
            cell = [r for r in records if r["model"] == m and r["target_class"] == c]
            values = [r[metric] for r in cell if metric in r]
            row.append(_mean_std(values))
            row += [_paper_cell(dataset, protocol, metric, m, c)] if with_paper(m) else []
        lines.append("| " + " | ".join(row) + " |")
    avg = ["**AVG**"]
    for m in models:
        avg.append(_average(records, m, metric, len(names) or 10))
        avg += [_paper_cell(dataset, protocol, metric, m, 10)] if with_paper(m) else []
    lines += ["| " + " | ".join(avg) + " |", ""]
    return lines


def _mean_std(fractions: list[float]) -> str:
    if not fractions:
        return "–"
    v = 100 * np.asarray(fractions)
    note = "" if len(v) == len(SEEDS) else f" (n={len(v)})"
    if len(v) == 1:
        return f"{v[0]:.2f}{note}"  # one seed: no spread to show
    return f"{v.mean():.2f}±{v.std(ddof=1):.2f}{note}"


def _average(records: list[dict], model: str, metric: str, n_classes: int) -> str:
    """Per seed, the mean over its classes; then mean ± std over the seeds that finished every class (a
    seed still running covers other classes, so its mean is not comparable: it is named, not averaged).
    With no seed finished, over the seeds' partial means, saying how many classes they cover."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r["model"] == model and metric in r:
            by_seed[r["seed"]].append(r[metric])
    if not by_seed:
        return "–"
    complete = [float(np.mean(v)) for v in by_seed.values() if len(v) == n_classes]
    partial = {seed: len(v) for seed, v in sorted(by_seed.items()) if len(v) != n_classes}
    if not complete:
        counts = "/".join(map(str, sorted(set(partial.values()))))
        return f"{_mean_std([float(np.mean(v)) for v in by_seed.values()])} [{counts} of {n_classes} classes]"
    running = "".join(f" [seed {s}: {k} of {n_classes} classes, not averaged]" for s, k in partial.items())
    return _mean_std(complete) + running


def _paper_cell(dataset: str, protocol: str, metric: str, model: str, index: int) -> str:
    if protocol == "one_class":
        value = paper_tables.one_class_auroc(dataset, model) if index == 10 and metric == "auroc" else None
        return "–" if value is None else f"{100 * value:.1f}"
    table = paper_tables.roco(dataset, metric, model)
    if table is None:
        return "–"
    mean, std = table[index]
    return f"{mean:.2f}±{std:.2f}"
