"""The accuracy results as markdown: ours beside the papers', class by class, mean ± std over seeds.

One section per (dataset, protocol, epoch cap). Per class, "ours" is the mean ± sample std over the seeds
that finished (the count is shown when it is not 3). The AVG row is, per seed, the mean over the classes
that seed finished, then mean ± std over seeds; a partial row says how many classes it covers.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import paper_tables
from benchmarks.accuracy import PAPER_MAX_EPOCHS, SEEDS

METRICS = ("auroc", "auprc", "f1")
MODEL_ORDER = ("ae", "memae", "memorizer", "rftm", "daad", "anomem")


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
    m = results.get("machine", {})
    return [
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}; "
        f"commit `{results.get('commit', '?')}`. Numbers in %. Ours: mean ± std over the seeds run; "
        "paper: as published. Regenerate: `mnemo bench accuracy --help`.",
        "",
    ]


def _section(dataset: str, protocol: str, cap: int, records: list[dict]) -> list[str]:
    seeds = sorted({r["seed"] for r in records})
    title = f"## {dataset}, {protocol}"
    if cap < PAPER_MAX_EPOCHS:
        title += f" — CAPPED at {cap} epochs (not the papers' protocol: early stopping, patience 10, ≤ 100)"
    lines = [title, "", f"Seeds: {', '.join(map(str, seeds))} (papers: {', '.join(map(str, SEEDS))}).", ""]
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
    metrics = METRICS if protocol == "roco" else ("auroc",)
    for metric in metrics:
        lines += _metric_table(dataset, protocol, metric, models, records)
    return lines


def _metric_table(
    dataset: str, protocol: str, metric: str, models: list[str], records: list[dict]
) -> list[str]:
    names = paper_tables.CLASS_NAMES.get(dataset, [str(i) for i in range(10)])
    header = ["class"] + [f"{m} {label}" for m in models for label in ("ours", "paper")]
    lines = [f"### {metric.upper()}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    classes = sorted({r["target_class"] for r in records})
    for c in classes:
        row = [names[c] if c < len(names) else str(c)]
        for m in models:
            values = [r[metric] for r in records if r["model"] == m and r["target_class"] == c]
            row += [_mean_std(values), _paper_cell(dataset, protocol, metric, m, c)]
        lines.append("| " + " | ".join(row) + " |")
    avg = ["**AVG**"]
    for m in models:
        avg += [_average(records, m, metric), _paper_cell(dataset, protocol, metric, m, 10)]
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


def _average(records: list[dict], model: str, metric: str) -> str:
    """Per seed, the mean over its finished classes; then mean ± std over seeds."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r["model"] == model:
            by_seed[r["seed"]].append(r[metric])
    if not by_seed:
        return "–"
    counts = {len(v) for v in by_seed.values()}
    text = _mean_std([float(np.mean(v)) for v in by_seed.values()])
    return text if counts == {10} else f"{text} [{'/'.join(map(str, sorted(counts)))} of 10 classes]"


def _paper_cell(dataset: str, protocol: str, metric: str, model: str, index: int) -> str:
    if protocol == "one_class":
        value = paper_tables.one_class_auroc(dataset, model) if index == 10 and metric == "auroc" else None
        return "–" if value is None else f"{100 * value:.1f}"
    table = paper_tables.roco(dataset, metric, model)
    if table is None:
        return "–"
    mean, std = table[index]
    return f"{mean:.2f}±{std:.2f}"
