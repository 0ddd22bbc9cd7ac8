"""``mnemo bench highres``: tiling against resizing on high-resolution frames with small defects (issue 14).

The set is the synthetic-defect generator scaled up (``training.synthetic.generate`` with ``defect_size``):
2048×2048 brick frames, the texture at its own scale, each defect drawn in a 96 px window so that it
covers a few hundred of the frame's 4 million pixels. Two runs of the default recipe (``restore``) at the
same model size and the same training budget:

* ``tiled``: ``--tiled``: tiles of the model's size cut at ``scale`` × the frame's resolution;
* ``resized``: the frame shrunk to the model's size, as an untiled bundle serves it.

Both are judged on the same pixels: the tiled run's stitched heatmaps and the resized run's heatmaps
stretched (bilinear) to the tiling's working resolution, against the masks at that resolution; image
AUROC from each run's own scores. Latency: each exported bundle behind a real ``mnemo serve`` (ONNX
Runtime, CPU), every test frame POSTed one after the other as a PNG, the client's wall time per frame.
A finished arm of the same setup is judged again, not trained again, so an interrupted run resumes.
A benchmark, not a test: timings depend on the machine (recorded in the results).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnemo.benchmarks.accuracy import git_commit, machine
from mnemo.benchmarks.serve import Server
from mnemo.imaging import resize_to
from mnemo.tiling import Tiling
from mnemo.training import config as run_config
from mnemo.training.datasets import ImageFolderDataset, mvtec_samples
from mnemo.training.detection_metrics import pixel_auroc, pro_score
from mnemo.training.evaluate import score_dataset
from mnemo.training.run import export_run, load_model, loader, preprocessing_of, train_run
from mnemo.training.synthetic import generate
from mnemo.training.tiled_datasets import FrameDataset

REPO = Path(__file__).resolve().parents[1]
ARMS = ("tiled", "resized")


@dataclasses.dataclass(frozen=True)
class Setup:
    size: int = 2048  # frame side
    defect_size: int = 96  # window each defect is drawn in
    n_train: int = 60
    n_test_good: int = 20
    n_test_defect: int = 6  # per defect type (5 types)
    tile: int = 64  # the model's input size, both arms
    overlap: int = 16
    scale: float = 0.25  # tiled working resolution: 512 px for 2048 px frames
    minutes: float = 5.0  # training budget of each arm
    seed: int = 0


def dataset(setup: Setup, work: Path) -> Path:
    """The frames, generated once per setup (``dataset.json`` says which)."""
    path = work / "data"
    wanted = {"size": setup.size, "defect_size": setup.defect_size, "seed": setup.seed}
    summary = path / "dataset.json"
    if summary.is_file() and all(json.loads(summary.read_text()).get(k) == v for k, v in wanted.items()):
        counts = json.loads(summary.read_text())["counts"]
        if counts.get("train/good") == setup.n_train and counts.get("test/good") == setup.n_test_good:
            return path
    generate(
        path, texture="brick", size=setup.size, n_train=setup.n_train, n_test_good=setup.n_test_good,
        n_test_defect=setup.n_test_defect, seed=setup.seed, defect_size=setup.defect_size,
    )  # fmt: skip
    return path


def arm_config(arm: str, setup: Setup, data: Path, work: Path) -> run_config.RunConfig:
    """The default recipe at ``tile`` px, tiled or not, under the same time budget."""
    cfg = run_config.load(run_config.recipe_path(run_config.DEFAULT_RECIPE))
    return dataclasses.replace(
        cfg,
        model_config={**cfg.model_config, "image_size": setup.tile},
        data=dataclasses.replace(
            cfg.data, path=str(data), tiled=arm == "tiled", tile_overlap=setup.overlap, tile_scale=setup.scale
        ),
        optim=dataclasses.replace(cfg.optim, max_minutes=setup.minutes),
        seed=setup.seed,
        device="cpu",
        out_dir=str(work / arm),
    )


def finished(cfg: run_config.RunConfig) -> bool:
    """Whether ``cfg``'s run directory holds a finished run of the same recipe, data and budget (then it
    is judged again rather than trained again: an interrupted benchmark resumes)."""
    out = cfg.output_path
    if not (out / "report.json").is_file() or not (out / "config.yaml").is_file():
        return False
    saved = run_config.load(out / "config.yaml")
    same_model = all(saved.model_config.get(k) == v for k, v in cfg.model_config.items())
    return (
        same_model
        and (saved.model, saved.data, saved.seed) == (cfg.model, cfg.data, cfg.seed)
        and saved.optim.max_minutes == cfg.optim.max_minutes
    )


def pixel_metrics_at_working_resolution(run: Path, data: Path, setup: Setup) -> dict[str, float]:
    """The resized run's heatmaps, stretched to the tiling's working resolution, against its masks."""
    model = load_model(run)
    cfg = run_config.load(run / "config.yaml")
    prep = preprocessing_of(model, cfg.data.resize)
    samples = mvtec_samples(data, "test")
    scored = score_dataset(
        model, loader(ImageFolderDataset(samples, prep), 16, 0), torch.device("cpu"), False
    )
    frames = FrameDataset(samples, prep, Tiling(setup.tile, setup.overlap, setup.scale))
    width, height = frames.sizes[0]
    heat = np.stack([resize_to(h[..., None], width, height)[..., 0] for h in scored.heatmaps])
    masks = np.stack([frames[i]["mask"].numpy()[0] > 0.5 for i in range(len(frames))])
    return {"auroc": pixel_auroc(heat, masks), "pro": pro_score(heat, masks)}


def latency(bundles: dict[str, Path], data: Path, work: Path) -> dict[str, dict[str, float]]:
    """Client wall time per test frame through a real server, each bundle in turn, frames one by one."""
    models = work / "served"
    models.mkdir(exist_ok=True)
    for arm, bundle in bundles.items():
        link = models / arm
        if not link.exists():
            link.symlink_to(bundle.resolve())
    frames = [s.path.read_bytes() for s in mvtec_samples(data, "test")]
    server = Server(models, max_batch_size=16, max_wait_ms=2, max_queue=512)
    server.start()
    try:
        out = {}
        for arm in bundles:
            times = [_post(server.url, arm, body) for body in frames[:2] + frames]  # 2 warm-up frames
            times = times[2:]
            out[arm] = {
                "median_ms": 1000 * statistics.median(times),
                "p95_ms": 1000 * float(np.percentile(times, 95)),
                "frames": len(times),
            }
        return out
    finally:
        server.stop()


def _post(url: str, model: str, body: bytes) -> float:
    request = urllib.request.Request(
        f"{url}/v1/models/{model}:score", data=body, headers={"Content-Type": "image/png"}, method="POST"
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as answer:
        answer.read()
    return time.perf_counter() - started


def run(setup: Setup, work: Path, results: Path, progress: bool = True) -> dict[str, Any]:
    """Both arms trained, judged and timed; writes ``highres.json`` and ``highres.md`` to ``results``."""
    work.mkdir(parents=True, exist_ok=True)
    data = dataset(setup, work)
    record: dict[str, Any] = {
        "setup": dataclasses.asdict(setup),
        "machine": machine(),
        "commit": git_commit(REPO),
    }
    bundles = {}
    for arm in ARMS:
        cfg = arm_config(arm, setup, data, work)
        out = cfg.output_path if finished(cfg) else train_run(cfg, progress=progress)
        report = json.loads((out / "report.json").read_text())
        pixel = (
            report["test"]["pixel"]
            if arm == "tiled"
            else pixel_metrics_at_working_resolution(out, data, setup)
        )
        record[arm] = {
            "image_auroc": report["test"]["image"]["auroc"],
            "pixel_auroc": pixel["auroc"],
            "pro": pixel["pro"],
            "epochs": report["epochs"],
            "train_minutes": report["train_seconds"] / 60,
        }
        bundles[arm] = work / "bundles" / arm
        export_run(out, bundles[arm], name=arm)
    for arm, timing in latency(bundles, data, work).items():
        record[arm]["latency"] = timing
    tiling = Tiling(setup.tile, setup.overlap, setup.scale)
    record["tiled"]["tiles_per_frame"] = tiling.count(setup.size, setup.size)
    results.mkdir(parents=True, exist_ok=True)
    (results / "highres.json").write_text(json.dumps(record, indent=2, default=float))
    (results / "highres.md").write_text(markdown(record))
    return record


def markdown(record: dict[str, Any]) -> str:
    s = record["setup"]
    working = round(s["size"] * s["scale"])
    counts = f"{s['n_train']} good for training, {s['n_test_good']} good + 5 × {s['n_test_defect']} defective"
    lines = [
        "# High-resolution frames: tiling against resizing",
        "",
        f"{s['size']}×{s['size']} synthetic brick frames, defects drawn in {s['defect_size']} px windows "
        f"({counts} for testing). The default recipe (restore) at {s['tile']} px, {s['minutes']:g} minutes "
        f"of training each; tiled: {s['tile']} px tiles at scale {s['scale']:g} ({working} px working "
        f"resolution, overlap {s['overlap']}). Pixel metrics of both at {working} px. Latency: a real "
        "`mnemo serve` (ONNX Runtime, CPU), frames POSTed one after the other. Machine: "
        f"{record['machine'].get('cpu', '?')}, commit `{record['commit']}`. Reproduce: "
        "`mnemo bench highres`.",
        "",
        "| arm | image AUROC | pixel AUROC | PRO | epochs | latency median (p95) ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm in ARMS:
        r = record[arm]
        lat = r.get("latency", {})
        median, p95 = lat.get("median_ms", float("nan")), lat.get("p95_ms", float("nan"))
        lines.append(
            f"| {arm} | {100 * r['image_auroc']:.1f} | {100 * r['pixel_auroc']:.1f} | {100 * r['pro']:.1f} | "
            f"{r['epochs']} | {median:.0f} ({p95:.0f}) |"
        )
    lines += ["", f"Tiles per frame (tiled): {record['tiled'].get('tiles_per_frame')}.", ""]
    return "\n".join(lines)
