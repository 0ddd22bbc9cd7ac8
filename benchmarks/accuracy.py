"""``mnemo bench accuracy``: the papers' detection tables, reproduced cell by cell with the real pipeline.

A *cell* is one (dataset, protocol, model, class, seed) training run through ``training.run.train_run``
(the same code as ``mnemo train``): the papers' Adam 1e-3, batch 256, early stopping with patience 10 on a
10 % validation split drawn with seed 2022, up to 100 epochs. Each finished cell is appended to the results
JSON at once, so an interrupted run resumes where it stopped (a cell stopped mid-training from its last
epoch's checkpoint) and a rerun skips what is there. A cell's key includes its epoch cap, so a capped
(quick) result never stands in for the papers' protocol.

What runs where is the plan (``benchmarks/accuracy_plan.py``); the tables are ``accuracy_report.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

from mnemo.benchmarks.accuracy_plan import (
    DATASETS,
    PAPER_MAX_EPOCHS,
    PAPER_PATIENCE,
    REAL_DATASETS,
    REAL_MINUTES,
    REAL_RECIPES,
    TEXTURE_DATASET,
    TEXTURE_OPTIM,
    TEXTURE_SET,
    Cell,
    architecture,
    bank_override,
    model_overrides,
)
from mnemo.benchmarks.accuracy_report import write_markdown
from mnemo.training.synthetic import TEXTURES

# ------------------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from mnemo.machine import usable_cores

    return {
        "cpu": cpu,
        "cores": usable_cores(),
        "python": platform.python_version(),
        "torch": _torch_version(),
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def git_commit(repo: Path) -> str:
    """HEAD's hash, with ``+dirty`` when the code has local changes (read-only git calls).

    Changes under ``benchmarks/results/`` do not count: they are what the benchmarks write, often while
    another run is going on beside this one."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------------------- results


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"records": []}


def save_results(path: Path, results: dict[str, Any]) -> None:
    """Write atomically so an interrupted run never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def merge_results(path: Path, others: list[Path]) -> dict[str, Any]:
    """Fold the records of ``others`` into ``path`` (theirs win on equal keys) and save it."""
    results = load_results(path)
    for other in others:
        if not other.is_file():
            raise FileNotFoundError(f"no results file {other}")
        theirs = load_results(other)
        records = theirs["records"]
        keys = {r["key"] for r in records}
        results["records"] = [r for r in results["records"] if r["key"] not in keys] + records
        for key in ("machine", "commit"):  # a fresh file takes the provenance of what it merges
            if key in theirs:
                results.setdefault(key, theirs[key])
    save_results(path, results)
    return results


# --------------------------------------------------------------------------------------------- a cell


def texture_data(work: Path, texture: str) -> Path:
    """The cell's synthetic-defect set, generated once per texture and shared by every model and seed."""
    from mnemo.training.synthetic import generate

    path = work / "data" / texture
    if not (path / "dataset.json").is_file():
        generate(path, texture=texture, **TEXTURE_SET)
    return path


def data_config(cell: Cell, data_root: Path, work: Path):
    from mnemo.training import config as run_cfg

    if cell.dataset == TEXTURE_DATASET:
        return run_cfg.DataConfig(kind="folder", path=str(texture_data(work, TEXTURES[cell.target_class])))
    return run_cfg.DataConfig(
        kind="idx",
        path=str(data_root / DATASETS[cell.dataset]),
        protocol=cell.protocol,
        target_class=cell.target_class,
    )


def run_dir(cell: Cell, work: Path) -> Path:
    """The cell's run directory (its checkpoints while it trains; removed once recorded, unless kept)."""
    return work / cell.key.replace("/", "_")


def run_config(cell: Cell, data_root: Path, work: Path, patience: int, device: str):
    from mnemo.training import config as run_cfg

    if cell.dataset in REAL_DATASETS:
        return real_run_config(cell, data_root, work, device)
    optim = TEXTURE_OPTIM if cell.dataset == TEXTURE_DATASET else {}
    return run_cfg.RunConfig(
        model=architecture(cell.model),
        model_config=cell_model_config(cell),
        data=data_config(cell, data_root, work),
        optim=run_cfg.OptimConfig(max_epochs=cell.max_epochs, patience=patience, **optim),
        seed=cell.seed,
        device=device,
        out_dir=str(run_dir(cell, work)),
    )


def real_run_config(cell: Cell, data_root: Path, work: Path, device: str):
    """The model's shipped recipe on the real-defect folder, under ``REAL_MINUTES`` of training: its own
    caps and patience (``restore`` counts steps, not epochs), so a cell is what ``mnemo train --data DIR
    --max-minutes 15`` does; only an epoch cap below the papers' (a quick check) is imposed on it."""
    cfg = real_recipe(cell)
    epochs = cfg.optim.max_epochs if cell.max_epochs >= PAPER_MAX_EPOCHS else cell.max_epochs
    return dataclasses.replace(
        cfg,
        model_config=cell_model_config(cell),
        data=dataclasses.replace(cfg.data, path=str(data_root / REAL_DATASETS[cell.dataset])),
        optim=dataclasses.replace(cfg.optim, max_epochs=epochs, max_minutes=REAL_MINUTES),
        seed=cell.seed,
        device=device,
        out_dir=str(run_dir(cell, work)),
    )


def real_recipe(cell: Cell):
    """The shipped recipe a real-defect cell trains its model with."""
    from mnemo.training import config as run_cfg

    return run_cfg.load(run_cfg.recipe_path(REAL_RECIPES[architecture(cell.model)]))


def cell_model_config(cell: Cell) -> dict[str, Any]:
    """The model configuration the plan trains a cell with: the plan's overrides (IDX and texture cells)
    or the model's recipe (real-defect cells), plus the latent bank of a ``+bank`` model."""
    if cell.dataset in REAL_DATASETS:
        return {**real_recipe(cell).model_config, **bank_override(cell.dataset, cell.model)}
    return model_overrides(cell.dataset, cell.model)


def config_changes(record: dict[str, Any], cell: Cell) -> dict[str, tuple[Any, Any]]:
    """The fields of a cached record's model configuration the plan would now train its cell otherwise,
    as {field: (trained, planned)} (the key names the cell, not its configuration: an override, a
    real-defect recipe, ``BANK_SIZE``, ``IMAGE_BANK_SIZE`` or a model default changed); such a record is
    outdated, and its cell is run again rather than mixed in. Fields one side lacks (added or removed
    since) are no change; a record without its resolved configuration (older) is resolved with today's
    defaults."""
    model = architecture(cell.model)
    set_fields = record.get("model_config", {})
    try:
        trained = record.get("resolved_model_config") or resolved(model, set_fields)
    except TypeError:  # it set a field the model no longer has
        return {name: (value, None) for name, value in set_fields.items()}
    config = cell_model_config(cell)
    if cell.dataset not in DATASETS and "in_channels" not in config and "in_channels" in trained:
        from mnemo.training.run import channels_filled  # a folder run fills them from its images

        config = channels_filled(model, config, trained["in_channels"])
    planned = resolved(model, config)
    return {k: (trained[k], v) for k, v in planned.items() if k in trained and trained[k] != v}


def resolved(model: str, config: dict[str, Any]) -> dict[str, Any]:
    """Every field of ``model``'s configuration with ``config`` applied, as a record stores it (JSON)."""
    from mnemo import models

    return json.loads(json.dumps(dataclasses.asdict(models.make_config(model, **config))))


RESUMABLE_CHANGES = ("max_epochs", "max_minutes", "max_steps")  # optim caps a resumed cell may raise


def resume_conflicts(saved: dict[str, Any], cfg) -> list[str]:
    """The settings a checkpoint's run was trained with that ``cfg`` sets otherwise (the seed, the data,
    the optimiser but for its caps; one ``cfg`` leaves unset was filled from the model, so it agrees):
    continuing it would mix two protocols in one cell (the model config is checked by the trainer)."""
    new = cfg.to_dict()
    conflicts = ["seed"] if saved.get("seed") != new["seed"] else []
    conflicts += [f"data.{k}" for k, v in new["data"].items() if saved.get("data", {}).get(k) != v]
    conflicts += [
        f"optim.{k}"
        for k, v in new["optim"].items()
        if v is not None and k not in RESUMABLE_CHANGES and saved.get("optim", {}).get(k) != v
    ]
    return conflicts


def train_or_resume(cfg) -> tuple[Path, float | None]:
    """Train a cell, continuing from its run directory's last checkpoint when an earlier sitting was
    stopped mid-cell (an uncapped cell runs for hours). It starts over instead when the checkpoint is
    unreadable or was trained with other settings, and when the cell is under a time budget (a real-defect
    cell): ``--resume`` grants a fresh budget, and the cell would train longer than its peers. Returns the
    run directory and the training seconds of the earlier sittings (None: trained from the start).

    A resumed cell is not bit-identical to an uninterrupted one: the shuffling generator and torch's
    global generator (RFTM's forgetting, AnoMem's views) restart from the seed at the resumed epoch."""
    from mnemo.training.run import train_run
    from mnemo.training.trainer import CHECKPOINT_LAST, ResumeMismatch, read_checkpoint

    last = cfg.output_path / CHECKPOINT_LAST
    if last.exists() and cfg.optim.max_minutes == 0:
        try:
            saved = read_checkpoint(last, mmap=True)  # the settings only; the trainer reads the weights
            trained_with, earlier = saved["run_config"], saved["state"]["train_seconds"]
            if conflicts := resume_conflicts(trained_with, cfg):
                raise ResumeMismatch(f"cannot resume: {last} was trained with another {', '.join(conflicts)}")
            return train_run(cfg, resume=True, progress=False), earlier
        except ResumeMismatch as err:
            print(f"{err}: training the cell from the start")
    shutil.rmtree(cfg.output_path, ignore_errors=True)  # no checkpoint of another sitting may be loaded
    return train_run(cfg, progress=False), None


def run_cell(
    cell: Cell, data_root: Path, work: Path, patience: int, device: str, keep: bool
) -> dict[str, Any]:
    """Train + evaluate one cell; returns its record (metrics as fractions in [0, 1])."""
    from mnemo.training import config as run_cfg

    cfg = run_config(cell, data_root, work, patience, device)
    started = time.perf_counter()
    with ctrl_c_aborts():  # never the trainer's finish-the-run stop: it would record a cell cut short
        out, earlier = train_or_resume(cfg)
    seconds = time.perf_counter() - started + (earlier or 0.0)
    cfg = run_cfg.load(out / "config.yaml")  # as trained: in_channels read from the images, optim resolved
    report = json.loads((out / "report.json").read_text())
    image, pixel = report["test"]["image"], report["test"].get("pixel", {})
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return {
        **dataclasses.asdict(cell),
        "key": cell.key,
        "patience": cfg.optim.patience,  # as trained: a real-defect cell keeps its recipe's
        "model_config": cfg.model_config,
        # every field, defaults included: a later change of a default must not pass for the same cell
        "resolved_model_config": report["model_config"],
        "auroc": image["auroc"],
        "auprc": image["auprc"],
        "f1": image["f1"],
        **{name: pixel[key] for name, key in (("pixel_auroc", "auroc"), ("pro", "pro")) if key in pixel},
        "epochs": report["epochs"],
        "best_epoch": report["best_epoch"],
        "train_seconds": report.get("train_seconds"),
        "stop_reason": report.get("stop_reason"),
        **({"recipe": REAL_RECIPES[architecture(cell.model)]} if cell.dataset in REAL_DATASETS else {}),
        "seconds": round(seconds, 1),  # the cell's wall time, earlier sittings' training included
        "resumed": earlier is not None,
        "device": report["device"],
    }


# ------------------------------------------------------------------------------------------------ run


class CellArgs(NamedTuple):
    """``run_cell``'s arguments after the cell, the same for every cell of a run."""

    data_root: Path
    work: Path
    patience: int
    device: str
    keep: bool


def run(
    cells: list[Cell],
    data_root: Path,
    results_path: Path,
    work: Path,
    *,
    patience: int = PAPER_PATIENCE,
    device: str = "cpu",
    keep_runs: bool = False,
    markdown_path: Path | None = None,
    jobs: int = 1,
    threads: int = 1,
) -> dict[str, Any]:
    """Run every cell not yet in ``results_path``, saving after each; returns the results.

    ``jobs`` > 1 trains that many cells at once, each in its own process with ``threads`` torch threads
    (0: torch's default) and its output in ``work/<cell>.log``; this process alone writes the results.
    Ctrl-C stops the cells in training at once (not the trainer's finish-the-run stop, which would record
    a cell cut short): each keeps its last whole epoch's checkpoint, and a rerun continues from there."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    repo = Path(__file__).resolve().parents[1]
    results = load_results(results_path)
    todo = cells_to_run(results, cells, work, keep_runs)
    jobs = min(jobs, len(todo)) or 1
    logs = f" in {jobs} processes (logs: {work}/<cell>.log)" if jobs > 1 else ""
    print(
        f"accuracy: {len(cells)} cells, {len(cells) - len(todo)} cached, {len(todo)} to run{logs}", flush=True
    )
    if jobs > 1 and any(c.dataset in REAL_DATASETS for c in todo):
        print("accuracy: warning: real-defect cells train for a wall-clock budget; side by side they share "
              "the cores and train less than one alone would", flush=True)  # fmt: skip
    meta = {"machine": machine(), "commit": git_commit(repo)}
    cell_args = CellArgs(data_root, work, patience, device, keep=True)  # removed here once recorded
    try:
        finished = (
            run_in_processes(todo, cell_args, jobs, threads) if jobs > 1 else run_in_turn(todo, cell_args)
        )
        for i, (cell, record) in enumerate(finished, 1):
            record = {**record, **meta, "jobs": jobs}  # cells trained side by side share the machine
            results["records"].append(record)
            results.update(meta)
            save_results(results_path, results)
            if not keep_runs:
                shutil.rmtree(run_dir(cell, work), ignore_errors=True)
            if markdown_path is not None:
                write_markdown(results, markdown_path)
            print(
                f"[{i}/{len(todo)}] {cell.key}: AUROC {record['auroc']:.4f} AUPRC {record['auprc']:.4f} "
                f"F1 {record['f1']:.4f}  {record['epochs']} epochs, {record['seconds']:.0f} s",
                flush=True,
            )
    except KeyboardInterrupt:
        print("accuracy: stopped by Ctrl-C; a cell in training keeps its last whole epoch, and a rerun "
              "continues it (a real-defect cell, under a time budget, starts over)", flush=True)  # fmt: skip
        raise
    if markdown_path is not None:
        write_markdown(results, markdown_path)
    return results


def cells_to_run(results: dict[str, Any], cells: list[Cell], work: Path, keep_runs: bool) -> list[Cell]:
    """The cells without a record in ``results``, whose records the plan has outdated (a model config
    changed) are dropped from it; unless ``keep_runs``, the run directories of recorded cells are removed
    (a run stopped between saving its record and removing its directory left one)."""
    planned = {c.key: c for c in cells}
    outdated = []
    for record in results["records"]:
        if record["key"] in planned and (changes := config_changes(record, planned[record["key"]])):
            outdated.append(record)
            said = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
            print(f"accuracy: {record['key']} was trained otherwise ({said}): running it again", flush=True)
    results["records"] = [r for r in results["records"] if r not in outdated]
    done = {r["key"] for r in results["records"]}
    for cell in cells:
        if cell.key in done and not keep_runs:
            shutil.rmtree(run_dir(cell, work), ignore_errors=True)
    return [c for c in cells if c.key not in done]


@contextlib.contextmanager
def ctrl_c_aborts() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` at once in the block (main thread only; the trainer then leaves
    the handler be), so a cell keeps its last whole epoch's checkpoint; the previous handler after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _abort)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _abort(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_in_turn(todo: list[Cell], cell_args: CellArgs) -> Iterator[tuple[Cell, dict[str, Any]]]:
    for i, cell in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {cell.key} …", flush=True)
        yield cell, run_cell(cell, *cell_args)


def run_in_processes(
    todo: list[Cell], cell_args: CellArgs, jobs: int, threads: int
) -> Iterator[tuple[Cell, dict[str, Any]]]:
    """Yield each cell's record as it finishes, ``jobs`` cells training at once. Processes are spawned,
    not forked (a forked CUDA context is unusable). A cell is handed out only when a process is free, so
    after a failure no new cell begins; those training finish and are yielded, then the first failure is
    raised. When this process stops (Ctrl-C, an error saving a record), so do the cells in training."""
    work = cell_args.work
    for texture in sorted({c.target_class for c in todo if c.dataset == TEXTURE_DATASET}):
        texture_data(work, TEXTURES[texture])  # generated once here, not raced by two workers
    waiting = iter(todo)
    failure: BaseException | None = None
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        try:
            running = {
                pool.submit(run_cell_logged, c, *cell_args): c for c in itertools.islice(waiting, jobs)
            }
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    cell = running.pop(future)
                    if error := future.exception():
                        said = (
                            "stopped by Ctrl-C"
                            if isinstance(error, KeyboardInterrupt)
                            else f"failed: {error!r}"
                        )
                        log = run_dir(cell, work).with_suffix(".log")
                        print(f"accuracy: {cell.key} {said}, not recorded (its log: {log})", flush=True)
                        failure = failure or error
                    else:
                        yield cell, future.result()
                    if failure is None and (following := next(waiting, None)) is not None:
                        running[pool.submit(run_cell_logged, following, *cell_args)] = following
        except BaseException:
            for child in multiprocessing.active_children():  # the pool's workers: abort their cells now
                os.kill(child.pid, signal.SIGINT)
            raise
    if failure is not None:
        raise failure


def _init_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # idle; ``run_cell`` aborts on Ctrl-C while it trains
    if threads:
        from mnemo.training.trainer import set_threads

        set_threads(threads)


def run_cell_logged(
    cell: Cell, data_root: Path, work: Path, patience: int, device: str, keep: bool
) -> dict[str, Any]:
    """``run_cell`` with its output in ``work/<cell>.log`` (cells side by side would interleave theirs)."""
    work.mkdir(parents=True, exist_ok=True)
    log_path = run_dir(cell, work).with_suffix(".log")
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return run_cell(cell, data_root, work, patience, device, keep)
