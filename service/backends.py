"""Inference runners: ONNX Runtime and TorchScript behind one tiny interface.

A runner maps a float32 batch ``[B, C, H, W]`` (already normalised) to ``(score[B], heatmap[B, 1, H, W])``
as numpy arrays. torch is imported only inside ``TorchScriptRunner`` so that the ONNX path, and the slim
CPU image built for it, never needs torch.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from mnemo.bundle import ONNX_FILE, TORCHSCRIPT_FILE
from mnemo.machine import usable_cores


class Runner(Protocol):
    backend: str
    device: str
    input_shape: tuple[int | None, ...]  # [C, H, W] the graph expects; None where it is dynamic

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


# Auto settings on a CPU (``threads=0``, ``spinning="auto"``) follow the model's cost, timed once at load
# on one thread. Under this per image, a request's own work (HTTP, decode, JSON: 1-2.5 ms) costs more than
# its inference: one thread, sleeping between batches, leaves the other cores to the requests (brick, 64 px:
# +10-50 % images/s on 2 cores, benchmarks/results/serve-inference-lane.md). At or above it the batches
# keep the cores busy: every core, spinning between batches (DAAD 256, ~30 ms: 0.69 -> 0.92 of raw ORT).
ONE_THREAD_MS_PER_IMAGE = 5.0
PROBE_BATCH = 4


class OnnxRunner:
    """ONNX Runtime session; CUDA execution provider when asked for (or ``auto`` and present).
    ``threads``: intra-op threads, 0 = auto; ``spinning``: idle threads spin between batches, ``"auto"``
    by the model's cost (see ``ONE_THREAD_MS_PER_IMAGE``)."""

    backend = "onnxruntime"

    def __init__(
        self, path: Path, device: str = "auto", threads: int = 0, spinning: bool | str = "auto"
    ) -> None:
        import onnxruntime as ort

        providers = self._providers(ort.get_available_providers(), device)
        cpu = providers == ["CPUExecutionProvider"]
        auto_threads = threads == 0 and cpu and usable_cores() > 1
        auto_spin = spinning == "auto"
        self.threads = 1 if auto_threads else threads  # 0: ONNX Runtime's own choice (every core)
        self.spinning = False if auto_spin else bool(spinning)
        self.session = self._session(ort, path, self.threads, self.spinning, providers)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in graph_input.shape[1:])
        self.output_names = ["score", "heatmap"]
        if cpu and (auto_threads or auto_spin) and self.ms_per_image() >= ONE_THREAD_MS_PER_IMAGE:
            self.threads = 0 if auto_threads else threads
            self.spinning = True if auto_spin else self.spinning
            self.session = self._session(ort, path, self.threads, self.spinning, providers)

    @staticmethod
    def _session(ort, path: Path, threads: int, spinning: bool, providers: list):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # ORT's own default is to spin; in a server idle spinning threads burn the cores that decode the
        # next images, so the service turns it off unless asked (MNEMO_ORT_SPINNING).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)

    def ms_per_image(self) -> float:
        """Milliseconds per image of a small zero batch, the best of three runs after a warm-up one."""
        if any(d is None for d in self.input_shape):
            return float("inf")  # no fixed shape to probe with: keep every core
        batch = np.zeros((PROBE_BATCH, *self.input_shape), np.float32)
        self.run(batch)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            self.run(batch)
            times.append(time.perf_counter() - started)
        return 1000 * min(times) / PROBE_BATCH

    @staticmethod
    def _providers(available: list[str], device: str) -> list[str | tuple[str, dict]]:
        if device == "cpu":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in available:
            if device.startswith("cuda"):
                raise RuntimeError(f"device {device!r} asked for, but ONNX Runtime has no CUDA provider")
            return ["CPUExecutionProvider"]
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, heatmap = self.session.run(self.output_names, {self.input_name: batch})
        return np.asarray(score), np.asarray(heatmap)


class TorchScriptRunner:
    """A traced TorchScript module on CPU or CUDA, run under ``inference_mode``."""

    backend = "torchscript"

    def __init__(self, path: Path, device: str = "auto", threads: int = 0) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self._device = torch.device(device)
        self.device = str(self._device)
        with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; it is our format
            warnings.simplefilter("ignore", DeprecationWarning)
            self.module = torch.jit.load(str(path), map_location=self._device).eval()
        self.input_shape = (None, None, None)  # traced graphs do not declare it

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._torch.inference_mode():
            score, heatmap = self.module(self._torch.from_numpy(batch).to(self._device))
        return score.float().cpu().numpy(), heatmap.float().cpu().numpy()


def resolve_backend(backend: str) -> str:
    """``auto`` is ONNX Runtime: always installed, torch-free, and CUDA-capable when its GPU build is."""
    return "onnxruntime" if backend == "auto" else backend


class ReconstructionRunner:
    """``reconstruction.onnx`` (x → x̂) in ONNX Runtime on the CPU, whatever the scoring backend: it runs
    only when a request asks for ``reconstruction=true``, outside the batcher."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        """[B, C, H, W] model inputs → [B, C, H, W] reconstructions, in the model's normalisation."""
        (rebuilt,) = self.session.run(None, {self.input_name: batch})
        return np.asarray(rebuilt, np.float32)


def create_runner(
    bundle_dir: Path, backend: str, device: str, threads: int = 0, ort_spinning: bool | str = "auto"
) -> Runner:
    backend = resolve_backend(backend)
    if backend == "onnxruntime":
        return OnnxRunner(bundle_dir / ONNX_FILE, device, threads, ort_spinning)
    if backend == "torchscript":
        return TorchScriptRunner(bundle_dir / TORCHSCRIPT_FILE, device, threads)
    raise ValueError(f"unknown backend {backend!r}; use auto, onnxruntime or torchscript")
