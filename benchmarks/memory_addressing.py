"""How many memory items a query reads: the addressing of MemAE-style memories in kept runs.

MemAE (Gong et al. eqs. 4-5) and DAAD (paper 003 eq. 1) address a bank of N items by a softmax over the
cosine similarity of the query and each item, then drop the weights below λ (1/N for DAAD). Paper 003
expects that "due to the sparsity in w, only a small number of memory items can be addressed each time":
that sparsity is what stops a memory from rebuilding an anomaly. Cosine logits lie in [-1, 1], so the
softmax cannot be much sharper than uniform; this module measures what a trained bank actually does.

For every memory in the model (each ``MemAEMemory``: MemAE's one, each of DAAD's scales) and every test
image, averaged over the image's queries: the items *kept* (non-zero weight after the drop) and the
*effective* number of items, 1 / Σ w_i² (N for uniform weights, 1 for a single item); shown for the
normal and the anomalous test images apart. Where both are close to N/2 and equal for the two groups,
the memory is a soft blend, not a lookup of a few prototypes.

Usage: python -m mnemo.benchmarks.memory_addressing --data ../shared/data/mnist --runs runs/one-class
(kept runs of either protocol: ``mnemo bench accuracy --models daad --keep-runs --work runs/one-class``)
"""

from __future__ import annotations

import numpy as np
import torch

from mnemo.benchmarks import kept_runs
from mnemo.models.memory.memae import MemAEMemory


def addressing(model: torch.nn.Module, images: torch.Tensor) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """Per memory (by module name): (N, items kept per image, effective items per image)."""
    banks = {name: m for name, m in model.named_modules() if isinstance(m, MemAEMemory)}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in banks}
    hooks = [
        bank.register_forward_hook(lambda _m, _i, out, name=name: seen[name].append(out[1].detach()))
        for name, bank in banks.items()
    ]
    batches = images.split(kept_runs.SCORE_BATCH)
    try:
        with torch.inference_mode():
            for batch in batches:
                model.score(batch)
    finally:
        for hook in hooks:
            hook.remove()
    sizes = [len(batch) for batch in batches]
    per_image = {}
    for name, bank in banks.items():  # queries are image-major: [images, queries per image, N]
        w = torch.cat([b.reshape(n, -1, b.shape[-1]) for b, n in zip(seen[name], sizes, strict=True)])
        kept = (w > 0).sum(dim=-1).float().mean(dim=1)
        effective = (1.0 / (w**2).sum(dim=-1)).mean(dim=1)
        per_image[name] = (bank.weight.shape[0], kept.numpy(), effective.numpy())
    return per_image


def main(argv: list[str] | None = None) -> int:
    data, runs = kept_runs.parse(__doc__, argv, "IDX")
    for path in runs:
        run = kept_runs.load(path, data)
        anomalous = np.asarray(run.splits.test.labels) == 1
        banks = addressing(run.model, run.test_images)
        if not banks:
            print(f"\n{path.name}: {type(run.model).__name__} has no MemAE-style memory")
            continue
        print(f"\n### {path.name} (class {run.target})\n")
        print("| memory | N | items kept: normal / anomalous | effective items: normal / anomalous |")
        print("| --- | --- | --- | --- |")
        for name, (n, kept, effective) in banks.items():
            print(
                f"| {name} | {n} | {kept[~anomalous].mean():.1f} / {kept[anomalous].mean():.1f} "
                f"| {effective[~anomalous].mean():.1f} / {effective[anomalous].mean():.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
