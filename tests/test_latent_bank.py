"""models/memory/latent_bank.py: the memory autoencoders scored with a bank of training latents."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from scipy.spatial.distance import cdist

from mnemo import models
from mnemo.models.memory import latent_bank
from mnemo.training.run import load_model, save_model
from tests.conftest import TINY_CONFIGS
from tests.export_check import assert_exports_match


def banked(name: str = "memorizer", size: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create(name, **TINY_CONFIGS[name], latent_bank=size)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def latents_and_errors(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        z = model.backbone.encode(x)
        errors = ((x - model.decode(z)[0]) ** 2).mean(dim=(1, 2, 3))
    return z.flatten(1).double().numpy(), errors.double().numpy()


def kept_order(model, train: torch.Tensor) -> list[int]:
    """The training images' indices in the order the bank holds their latents."""
    z, _ = latents_and_errors(model.eval(), train)
    return [int(np.abs(z - item).sum(axis=1).argmin()) for item in model.bank.items.double().numpy()]


@pytest.mark.parametrize("name", ["ae", "memae", "memorizer", "rftm"])
def test_the_score_sums_the_standardised_error_and_nearest_latent_distances(name, monkeypatch):
    """Checked against scipy: each cue's mean and spread over the first STAT_PROBES kept images, each
    against all the others (leave-one-out, in blocks of CHUNK), then a test image's error and distances to
    its nearest training latent."""
    monkeypatch.setattr(latent_bank, "CHUNK", 7)  # 3 blocks, the last one short
    monkeypatch.setattr(latent_bank, "STAT_PROBES", 18)
    model, train, test = banked(name).eval(), images(40), images(5, seed=9)
    model.after_fit(iter(train.split(16)))
    z, e = latents_and_errors(model, train)
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    own = np.eye(len(z), dtype=bool)
    probes = kept_order(model, train)[:18]
    loo = [np.where(own, np.inf, cdist(a, a)).min(axis=1)[probes] for a in (z, unit)]
    stats = [(c.mean(), c.std(ddof=1)) for c in (e[probes], *loo)]
    zt, et = latents_and_errors(model, test)
    cues = (
        et,
        cdist(zt, z).min(axis=1),
        cdist(zt / np.linalg.norm(zt, axis=1, keepdims=True), unit).min(axis=1),
    )
    expected = sum((c - m) / s for c, (m, s) in zip(cues, stats))
    with torch.no_grad():
        score, heat = model.score(test)
        plain = models.create(name, **TINY_CONFIGS[name])
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("bank.")})
        plain_heat = plain.eval().score(test)[1]
    np.testing.assert_allclose(score.numpy(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(heat, plain_heat)  # the heatmap stays the reconstruction error's
    with torch.no_grad():  # a training image is its own nearest latent: both distances vanish
        assert all(
            float(d.max()) < 1e-5 for d in model.bank.distances(model.backbone.encode(train[:3]).flatten(1))
        )


def test_the_bank_keeps_the_same_uniform_sample_however_the_images_are_batched():
    whole, by_sevens = banked(size=16), banked(size=16)
    train = images(60)
    whole.after_fit(iter([train]))
    by_sevens.after_fit(iter(train.split(7)))
    torch.testing.assert_close(whole.bank.items, by_sevens.bank.items)
    torch.testing.assert_close(whole.bank.stats, by_sevens.bank.stats)
    keys = torch.rand(60, generator=torch.Generator().manual_seed(0))
    assert kept_order(whole, train) == keys.argsort()[:16].tolist()  # the 16 smallest keys, in key order


def test_a_banked_model_saves_loads_and_exports_what_it_scores(tmp_path):
    model, train = banked(), images(30)
    with pytest.raises(ValueError, match="latent bank is not filled; refusing to export"):
        model.export_facts()
    model.after_fit(iter([train]))
    assert model.export_facts() == {"latent_bank_items": 30.0}  # fewer images than the bank holds: all
    save_model(model.eval(), tmp_path / "model.pt")  # the bank's shape is the images it kept, not 64
    loaded, test = load_model(tmp_path), images(4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(test)[0], model.score(test)[0])  # unit columns rebuilt
    assert_exports_match(model, test[:2], test, tmp_path)
    graph = onnx.load(tmp_path / "model.onnx").graph  # the unit columns, no second copy of the entries
    tensors = [*graph.initializer, *(n.attribute[0].t for n in graph.node if n.op_type == "Constant")]
    assert sum(numpy_helper.to_array(t).size == model.bank.items.numel() for t in tensors) == 1
    scripted = torch.jit.load(tmp_path / "model.ts")
    assert sum(t.numel() == model.bank.items.numel() for t in scripted.state_dict().values()) == 1


def test_a_bank_saved_as_its_latents_before_the_unit_columns_loads_and_scores_the_same():
    """Kept runs and bundles from before the bank stored unit columns hold ``bank.items`` [n, dim]."""
    model, test = banked(), images(4, seed=3)
    model.after_fit(iter([images(30)]))
    saved = model.eval().state_dict()
    saved["bank.items"] = model.bank.items.clone()
    old_format = {k: v for k, v in saved.items() if k not in ("bank.unit_columns", "bank.norms")}
    loaded = banked()
    loaded.load_state_dict(old_format)  # strict: no key left over, none missing
    torch.testing.assert_close(loaded.bank.unit_columns, model.bank.unit_columns)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().score(test)[0], model.score(test)[0])
    with pytest.raises(ValueError, match=r"shape \(30, 16\) \(latents × dimension\) does not fit"):
        banked(size=20).load_state_dict(old_format)  # reported as it was saved
    half = {k: v for k, v in model.state_dict().items() if k != "bank.norms"}
    with pytest.raises(ValueError, match="needs both its unit columns and their norms"):
        banked().load_state_dict(half, strict=False)  # never a bank of uninitialised norms


def test_an_unfilled_or_mismatched_bank_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="latent bank is not filled yet"):
        banked().eval().score(images(2))
    filled = banked(size=64)
    filled.after_fit(iter([images(30)]))
    refused = r"shape \(16, 30\) \(dimension × latents\) does not fit this model's \(at most 20 latents"
    with pytest.raises(ValueError, match=refused):
        banked(size=20).load_state_dict(filled.state_dict())
    smaller = banked(size=30)
    smaller.load_state_dict(filled.state_dict())  # a bank of up to 30 takes the 30 kept
    assert len(smaller.bank.items) == 30


def test_bank_sizes_out_of_reach_are_refused_when_the_model_is_made():
    with pytest.raises(ValueError, match="latent_bank must be 0 \\(off\\) or at least 2, got 1"):
        banked(size=1)
    with pytest.raises(ValueError, match="over 67,108,864: lower latent_bank"):
        banked(size=latent_bank.MAX_VALUES)
    with pytest.raises(ValueError, match="needs at least 2 training images, got 1"):
        banked().after_fit(iter([images(1)]))


def test_bank_cost_times_the_banked_graph_beside_the_same_weights_without_it(tmp_path, capsys):
    from mnemo.benchmarks import bank_cost

    model, run = banked(size=64), tmp_path / "run"
    model.after_fit(iter([images(40)]))
    run.mkdir()
    save_model(model.eval(), run / "model.pt")
    assert bank_cost.main([str(run), "--rounds", "1", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"test AUROC not measured: no config.yaml in {run}"
    assert lines[1].startswith("40 latents; ONNX plain") and len(lines) == 2 + len(bank_cost.BATCHES)
    plain = bank_cost.without_bank(model)
    with torch.no_grad():  # the plain graph is the papers' score of the same weights
        errors = model.error_map(images(3)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(plain.score(images(3))[0], errors)
    save_model(plain, run / "model.pt")
    with pytest.raises(SystemExit):
        bank_cost.main([str(run)])
    assert "has no latent bank" in capsys.readouterr().err
