"""DAAD / DAAD+ (paper 003): block-wise memory, memory-only skips, GAN losses, score scaling, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnemo import models
from mnemo.benchmarks import memory_addressing
from mnemo.models.memory import BlockwiseMemory
from mnemo.training.export import export_bundle
from tests.export_check import assert_exports_match

# 32 px: encoder maps 16, 8, 4 px, so one scale has multi-position blocks, one has 1×1 blocks, and one
# is smaller than the division rate 8.
TINY = dict(image_size=32, widths=(8, 16, 16), memory_size=10)
TINY_PLUS = dict(TINY, disc_widths=(8, 16))
NAMES = ("daad", "daad_plus")


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create(name, **(TINY_PLUS if name == "daad_plus" else TINY))


def images(batch: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1  # the paper's [-1, 1] pixels


class IdentityReadout(torch.nn.Module):
    """Stands in for the bank: returns every query unchanged."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return z, z.new_ones(z.shape[0], 1)


# --- block-wise memory (eqs. 1-2) -------------------------------------------------------------------


def test_blocks_are_contiguous_and_reassembly_is_an_exact_inverse():
    memory = BlockwiseMemory(5, channels=4, height=4, width=6, rates=(2, 3, 2))
    assert memory.rates == (2, 2, 3) and memory.block == (2, 2, 2) and memory.num_blocks == 12
    f = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).reshape(2, 4, 4, 6)
    q = memory.divide(f)
    assert q.shape == (2 * 12, 8)
    # image 1, channel block 1, height block 0, width block 2 → row 12 + 1·6 + 0·3 + 2
    torch.testing.assert_close(q[12 + 6 + 2], f[1, 2:4, 0:2, 4:6].flatten(), rtol=0, atol=0)
    assert torch.equal(memory.assemble(q), f)
    memory.memory = IdentityReadout()
    assert torch.equal(memory(f)[0], f)


def test_a_side_smaller_than_the_rate_is_divided_per_position():
    memory = BlockwiseMemory(5, channels=3, height=4, width=4, rates=(8, 8, 1))
    assert memory.rates == (1, 4, 4) and memory.block == (3, 1, 1)
    f = torch.randn(1, 3, 4, 4)
    q = memory.divide(f)
    for k in (0, 5, 15):
        torch.testing.assert_close(q[k], f[0, :, k // 4, k % 4], rtol=0, atol=0)
    with pytest.raises(ValueError, match="evenly"):
        BlockwiseMemory(5, channels=3, height=12, width=12, rates=(8, 8, 1))


def test_addressing_drops_weights_below_one_over_n_and_reads_out_eq_2():
    torch.manual_seed(0)
    n = 6
    memory = BlockwiseMemory(n, channels=2, height=2, width=2, rates=(2, 2, 1))  # D = 2, Q = 4
    with torch.no_grad():
        memory.memory.weight.copy_(torch.tensor([[1, 0], [0, 1], [-1, 0], [0, -1], [3, 3], [-2, 1.0]]))
    f = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]], [[0.2, 1.0], [-1.0, 0.3]]]])
    read, w = memory(f)
    w = w.reshape(-1, n)
    q = memory.divide(f)
    raw = torch.softmax(F.normalize(q, dim=-1) @ F.normalize(memory.memory.weight, dim=-1).t(), dim=-1)
    assert (w[raw < 1 / n] == 0).all(), "weights below 1/N must be exactly zero"
    assert (w[raw > 1 / n] > 0).all() and (raw < 1 / n).any()
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(4))
    torch.testing.assert_close(memory.divide(read), w @ memory.memory.weight)


def test_dot_addressing_can_read_one_item_where_cosine_blends_many():
    """Eq. 1's cosine logits lie in [-1, 1], so the softmax stays near uniform and the 1/N drop keeps a
    blend; the MemAE authors' dot product (``similarity: dot``) grows with the items' norms and can
    address a single item. ``memory_addressing`` counts both per memory and image."""
    x = images(6)[:, :1]
    counts = {}
    for similarity in ("cosine", "dot"):
        torch.manual_seed(0)
        config = dict(TINY, in_channels=1, division_rates=(1, 1, 1), similarity=similarity)  # a query per map
        model = models.create("daad", **config).eval()
        with torch.no_grad():
            for memory in model.generator.memories:
                memory.memory.weight.mul_(1000.0)  # norms matter to the dot product only
        counts[similarity] = memory_addressing.addressing(model, x)
    for n, kept, effective in counts["cosine"].values():
        assert n == 10 and (kept > 1).all() and (kept <= n).all()
        assert (effective <= kept + 1e-4).all()  # 1 / Σ w² never exceeds the items with w > 0
    for name, (_, kept, effective) in counts["dot"].items():
        assert (kept == 1).all() and torch.allclose(torch.from_numpy(effective), torch.ones(6)), name


# --- DAAD / DAAD+ shared behaviour ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_score_and_heatmap_shapes(name):
    model = tiny(name).eval()
    with torch.no_grad():
        score, heat = model.score(images(3))
    assert score.shape == (3,) and heat.shape == (3, 1, 32, 32)
    assert torch.isfinite(score).all() and torch.isfinite(heat).all()


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_the_encoder_and_only_through_the_memories(name):
    model = tiny(name).train()
    model.loss(images(4))["loss"].backward()
    encoder = list(model.generator.encoder.parameters())
    assert encoder[0].grad is not None and encoder[0].grad.abs().sum() > 0
    for memory in model.generator.memories:
        assert memory.memory.weight.grad.abs().sum() > 0

    model.zero_grad(set_to_none=True)
    for memory in model.generator.memories:  # cut every memory read-out from the graph
        memory.memory.register_forward_hook(lambda _m, _i, out: (out[0].detach(), out[1]))
    model.loss(images(4))["loss"].backward()
    assert all(p.grad is None for p in encoder), "a path from encoder to decoder bypasses the memory"


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_model_and_scores_independent_of_batch_mates(name):
    x = images(4)
    a, b, c = tiny(name, seed=3).eval(), tiny(name, seed=3).eval(), tiny(name, seed=4).eval()
    with torch.no_grad():
        for ta, tb in zip(a.score(x), b.score(x)):
            assert torch.equal(ta, tb)
        assert not torch.allclose(a.score(x)[0], c.score(x)[0])
        torch.testing.assert_close(a.score(x[2:3])[0], a.score(x)[0][2:3], atol=1e-6, rtol=1e-5)


def test_config_rejects_sizes_the_stages_cannot_halve():
    with pytest.raises(ValueError, match="widths"):
        models.create("daad", image_size=36, widths=(8, 16, 16))
    with pytest.raises(ValueError, match="disc_widths"):
        models.create("daad_plus", **dict(TINY_PLUS, disc_widths=(8, 8, 8, 8, 8, 8)))


# --- DAAD+ training ------------------------------------------------------------------------------------


def test_daad_plus_generator_loss_is_eq_3_of_finite_parts():
    model = tiny("daad_plus").train()
    cfg = model.config
    assert (cfg.lambda_rec, cfg.lambda_adv, cfg.lambda_ali, cfg.gamma) == (50.0, 0.5, 0.5, 0.9)
    parts = model.loss(images(4))
    assert all(torch.isfinite(v) for v in parts.values())
    expected = 50 * parts["reconstruction"] + 0.5 * parts["adversarial"] + 0.5 * parts["alignment"]
    torch.testing.assert_close(parts["loss"], expected)


def test_parameter_groups_partition_the_model():
    model = tiny("daad_plus")
    g = {id(p) for p in model.generator_parameters()}
    d = {id(p) for p in model.discriminator_parameters()}
    assert g and d and not g & d and g | d == {id(p) for p in model.parameters()}


def test_discriminator_step_changes_only_the_discriminator():
    model = tiny("daad_plus").train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.discriminator_parameters(), lr=2e-4)
    d_loss = model.discriminator_loss(images(4))
    assert d_loss.dim() == 0 and torch.isfinite(d_loss)
    d_loss.backward()
    assert all(p.grad is None for p in model.generator_parameters())
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == name.startswith("discriminator."), name


# --- DAAD+ score scaling (eq. 7) -----------------------------------------------------------------------


def test_score_scaling_starts_as_identity_and_fits_training_data_to_unit_range():
    model = tiny("daad_plus").eval()
    x = images(6)
    assert not bool(model.score_scaling_fitted)
    with torch.no_grad():
        rec, ali, _ = model.score_parts(x)
        torch.testing.assert_close(model.score(x)[0], 0.9 * rec + 0.1 * ali)

    model.train()
    constants = model.fit_score_scaling([x[:3], x[3:]])
    assert model.training, "fitting must restore the training mode"
    assert bool(model.score_scaling_fitted)
    assert constants["rec_min"] == pytest.approx(rec.min().item(), rel=1e-5)
    assert constants["ali_max"] == pytest.approx(ali.max().item(), rel=1e-5)
    model.eval()
    with torch.no_grad():
        rec_t, ali_t = model.scaled(*model.score_parts(x)[:2])
        score = model.score(x)[0]
    for scaled in (rec_t, ali_t):
        assert scaled.min() >= -1e-6 and scaled.max() <= 1 + 1e-6
        assert scaled.min() == pytest.approx(0, abs=1e-5) and scaled.max() == pytest.approx(1, abs=1e-5)
    torch.testing.assert_close(score, 0.9 * rec_t + 0.1 * ali_t)


def test_fitted_scaling_survives_a_state_dict_round_trip():
    model = tiny("daad_plus").eval()
    x = images(4)
    model.fit_score_scaling(x)
    copy = tiny("daad_plus", seed=9).eval()
    assert not bool(copy.score_scaling_fitted)
    copy.load_state_dict(model.state_dict())
    assert bool(copy.score_scaling_fitted)
    assert copy.score_scaling_constants() == model.score_scaling_constants()
    with torch.no_grad():
        assert torch.equal(copy.score(x)[0], model.score(x)[0])


def test_bundle_export_refuses_an_unfitted_daad_plus(tmp_path):
    model = tiny("daad_plus")
    with pytest.raises(ValueError, match="not fitted"):
        kwargs = dict(name="t", version="0", preprocessing={}, calibration={}, samples=images(2))
        export_bundle(model, tmp_path / "bundle", **kwargs)
    assert not (tmp_path / "bundle").exists()


# --- export ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_exports_to_torchscript_and_onnx_with_dynamic_batch(name, tmp_path):
    model = tiny(name).eval()
    if name == "daad_plus":
        model.fit_score_scaling(images(4, seed=2))  # non-identity constants must be in the graph
    assert_exports_match(model, images(2), images(3, seed=5), tmp_path)


def test_daad_plus_fits_its_score_scaling_after_training_and_exports_the_constants():
    model = tiny("daad_plus").train()
    with pytest.raises(ValueError, match="not fitted"):
        model.export_facts()
    model.after_fit(iter([images(3), images(3, seed=2)]))
    assert bool(model.score_scaling_fitted) and model.training
    assert model.export_facts() == model.score_scaling_constants()
