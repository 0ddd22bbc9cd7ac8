"""Data-parallel training under ``torchrun`` (issue 15): ``torchrun --nproc_per_node N -m mnemo train ...``.

torchrun starts N processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous; each
process trains the same model on its own shard of every epoch, and the gradients are averaged before
every optimizer step. That is what DistributedDataParallel does, but done at the optimizer
(``register_step_pre_hook``) instead of around ``forward``: Mnemo's models take their own steps
(``training_step``; DAAD+ steps a discriminator and a generator), and DDP only syncs gradients made
through its wrapped ``forward``. Backend gloo on the CPU, NCCL on CUDA (one GPU per process, ``LOCAL_RANK``).

What the processes agree on, so that none waits on a collective the others skipped:

* the data: each epoch's permutation is the same everywhere, each rank takes every ``world``-th image and
  all take the same number (``TensorBatches(rank=, world=)``; a ``DistributedSampler`` for folders
  that stream), so every rank takes the same number of steps;
* a stop: the time budget, Ctrl-C or ``max_steps`` on any rank stops all after the same step (``agree``);
* the weights: rank 0's initial weights are broadcast, and its buffers (BatchNorm statistics, memories
  updated outside autograd) before each validation, so validation loss and early stopping agree; that
  loss is averaged over ranks as well.

Rank 0 alone writes checkpoints, history, the model, calibration, report and plots; ``--batch-size`` is
per process (the global batch is N times it), and ``--max-minutes`` is the same wall-clock budget for all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> World:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), else a world of one on ``device``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(0, 1, device)
    cuda = device.type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return World(dist.get_rank(), dist.get_world_size(), device)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_state(module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters (unless ``buffers_only``) and buffers on every rank."""
    if not active():
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def average_gradients_before_steps(optimizers: list[torch.optim.Optimizer]) -> None:
    """Before each ``optimizer.step()``, replace every gradient by its mean over the ranks."""
    if not active():
        return
    world = dist.get_world_size()

    def average(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per step, not one per tensor
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    for optimizer in optimizers:
        optimizer.register_step_pre_hook(average)


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return not active() or dist.get_rank() == 0


def agree(flag: bool) -> bool:
    """True on every rank as soon as it is True on one (a stop request)."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean(value: float) -> float:
    """The mean of ``value`` over the ranks."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU ones."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def barrier() -> None:
    if active():
        dist.barrier()


def finish() -> None:
    """Leave the process group; every rank does so together (after a ``barrier``): a rank leaving while
    another still holds the group can abort in gloo's teardown."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
