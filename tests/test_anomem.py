"""AnoMem (paper 002): Hopfield memory, stage-1 and stage-2 losses, scoring and export, on tiny configs."""

from __future__ import annotations

import math

import pytest
import torch

from mnemo import models
from mnemo.models.anomem import channels_last, double_hinge, sample_positions, variance_loss
from mnemo.models.contrastive import nt_xent
from mnemo.models.memory import HopfieldMemory
from tests.export_check import assert_exports_match

TINY = dict(
    image_size=32, stage_widths=(8, 16, 16, 32), stage_depths=(1, 1, 1, 1), memory_sizes=(16, 8), oe_hidden=16
)


def tiny(seed: int = 0, **overrides) -> models.AnomalyModel:
    torch.manual_seed(seed)
    return models.create("anomem", **{**TINY, **overrides})


def images(batch: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen)


# --- Hopfield memory ---------------------------------------------------------------------------------


def test_hopfield_with_large_beta_returns_the_nearest_stored_pattern():
    torch.manual_seed(0)
    memory = HopfieldMemory(num_slots=5, dim=8, beta=100.0)
    rows = torch.linalg.qr(torch.randn(8, 8))[0][:5]  # orthonormal patterns
    with torch.no_grad():
        memory.patterns.copy_(rows)
    order = torch.tensor([3, 0, 4, 1, 2, 3])
    queries = rows[order] + 0.1 * torch.randn(6, 8)
    read, weights = memory(queries)
    assert torch.equal(weights.argmax(-1), order)
    torch.testing.assert_close(read, rows[order], atol=1e-3, rtol=0)


def test_hopfield_read_out_is_a_convex_combination_of_the_patterns():
    torch.manual_seed(0)
    memory = HopfieldMemory(num_slots=6, dim=4, beta=2.0)
    with torch.no_grad():
        memory.patterns.normal_()
    read, weights = memory(torch.randn(10, 4))
    assert torch.all(weights > 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))
    torch.testing.assert_close(read, weights @ memory.patterns)


def test_hopfield_steps_repeat_the_update_and_normalize_works_on_the_unit_sphere():
    torch.manual_seed(0)
    q = torch.randn(3, 5)
    two = HopfieldMemory(num_slots=4, dim=5, beta=2.0, steps=2)
    p = two.patterns.detach()
    once = torch.softmax(2.0 * q @ p.t(), -1) @ p
    torch.testing.assert_close(two(q)[0], torch.softmax(2.0 * once @ p.t(), -1) @ p)

    unit = HopfieldMemory(num_slots=4, dim=5, normalize=True)
    torch.testing.assert_close(unit.state(7 * q).norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(unit(q)[0], unit(7 * q)[0])  # cosine retrieval is scale invariant
    assert torch.all(unit(q)[0].norm(dim=-1) <= 1 + 1e-6)


def test_hopfield_applies_per_position_on_feature_maps():
    torch.manual_seed(0)
    memory = HopfieldMemory(num_slots=4, dim=6)
    z = torch.randn(2, 6, 3, 5)
    per_map, _ = memory(channels_last(z))
    per_vector, _ = memory(z.permute(0, 2, 3, 1).reshape(-1, 6))
    torch.testing.assert_close(per_map.reshape(-1, 6), per_vector)


# --- losses on hand-made tensors ---------------------------------------------------------------------


def test_nt_xent_follows_the_paper_and_prefers_aligned_pairs():
    torch.manual_seed(0)
    a, b, tau = torch.randn(3, 4), torch.randn(3, 4), 0.5
    views = torch.cat([a, b])
    cos = torch.nn.functional.cosine_similarity(views[:, None], views[None], dim=-1)

    def ell(i: int, j: int) -> torch.Tensor:  # ℓ_NTX between views[i] and views[j], denominator p ≠ i
        others = torch.cat([cos[i, :i], cos[i, i + 1 :]])
        return -(cos[i, j] / tau - torch.logsumexp(others / tau, 0))

    by_hand = sum(ell(k, k + 3) + ell(k + 3, k) for k in range(3)) / 6
    torch.testing.assert_close(nt_xent(a, b, tau), by_hand)

    pairs = 4 * torch.eye(4, 8)  # orthogonal vectors: every negative has similarity 0
    aligned = nt_xent(pairs, pairs.clone(), 0.1)
    shuffled = nt_xent(pairs, pairs[[1, 2, 3, 0]], 0.1)
    assert aligned < 0.01 < math.log(7) < shuffled
    batched = nt_xent(torch.stack([pairs, pairs]), torch.stack([pairs, pairs[[1, 2, 3, 0]]]), 0.1)
    torch.testing.assert_close(batched, torch.stack([aligned, shuffled]))


def test_variance_loss_rewards_spread_among_normal_recollections_only():
    collapsed = torch.ones(2, 4, 3)  # [positions, batch, dim]
    spread = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    all_normal = torch.ones(4)
    torch.testing.assert_close(variance_loss(collapsed, all_normal), torch.full((2,), -0.01))
    assert torch.all(variance_loss(spread, all_normal) < -0.1)
    half_spread = collapsed.clone()
    half_spread[:, 2:] = spread[:, 2:]
    torch.testing.assert_close(
        variance_loss(half_spread, torch.tensor([1.0, 1, 0, 0])), torch.full((2,), -0.01)
    )
    torch.testing.assert_close(variance_loss(spread, torch.tensor([1.0, 0, 0, 0])), torch.zeros(2))


def test_double_hinge_keeps_normals_inside_1_over_m_and_anomalies_beyond_m():
    d = torch.tensor([0.4, 1.5, 3.0, 0.5])
    normal = torch.tensor([1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(double_hinge(d, normal, margin=2.0), torch.tensor([0.0, 1.0, 0.0, 1.5]))


def test_position_sampling_draws_floor_h_w_r_distinct_positions():
    idx = sample_positions(64, 0.3, torch.device("cpu"))
    assert idx.numel() == 19 and idx.unique().numel() == 19 and idx.min() >= 0 and idx.max() < 64
    assert torch.equal(sample_positions(16, 1.0, torch.device("cpu")), torch.arange(16))
    assert sample_positions(4, 0.01, torch.device("cpu")).numel() == 1


# --- the model ---------------------------------------------------------------------------------------


def test_scores_merge_the_scales_by_eq_9_and_the_heatmap_is_at_input_size():
    model = tiny().eval()
    x = images(3)
    with torch.no_grad():
        score, heat = model.score(x)
        deltas = model.deviations(x)
    assert [d.shape for d in deltas] == [(3, 16, 4, 4), (3, 32, 2, 2)]
    norms = torch.stack([d.flatten(1).norm(dim=1) for d in deltas], 1)  # ‖Δ^(s)‖₂, eq. 6
    torch.testing.assert_close(score, (1 * norms[:, 0] + 2 * norms[:, 1]) / 3)  # λ = (1, 2)
    assert heat.shape == (3, 1, 32, 32) and torch.all(heat >= 0)


def test_outlier_exposure_mode_scores_with_the_heads():
    model = tiny(scoring="outlier_exposure").eval()
    x = images(2)
    with torch.no_grad():
        score, _ = model.score(x)
        distances = torch.cat([head(d) for head, d in zip(model.oe_heads, model.deviations(x))], 1)
    torch.testing.assert_close(score, distances @ torch.tensor([1 / 3, 2 / 3]))


def test_gradient_reaches_the_encoder_through_the_hopfield_memory():
    model = tiny().train()
    z = model.encoder(images(), model.taps)[-1]
    recalled, _ = model.memories[-1](channels_last(z))
    recalled.sum().backward()
    stem = model.encoder.stem[0][0].weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    model.zero_grad()
    model.loss(images())["loss"].backward()
    assert all(m.patterns.grad.abs().sum() > 0 for m in model.memories)
    assert stem.grad.abs().sum() > 0


def test_same_seed_gives_the_same_model_and_scores():
    x = images()
    with torch.no_grad():
        a, b, c = (tiny(seed).eval().score(x)[0] for seed in (3, 3, 4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_augmentation_and_position_sampling_only_in_training():
    model = tiny()
    x = images()
    model.eval()
    with torch.no_grad():
        for first, second in zip(model.score(x), model.score(x)):
            assert torch.equal(first, second)
        assert torch.equal(model.loss(x)["loss"], model.loss(x)["loss"])
        model.train()
        assert not torch.equal(model.loss(x)["loss"], model.loss(x)["loss"])
        view = model.views(x)
    assert view.shape == x.shape and not torch.allclose(view, x)


def test_anomalies_skip_the_memory_in_stage_1():
    model = tiny().eval()
    q = torch.randn(3, 2, 32)  # [positions, batch, C] at the last scale
    recalled = model.recall(1, q, normal=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(recalled[:, 1], q[:, 1])
    torch.testing.assert_close(recalled[:, 0], model.memories[1](q[:, 0])[0])
    losses = model.contrastive_memory_loss(images(), labels=torch.tensor([0, 0, 1, 1]))
    assert torch.isfinite(losses["loss"])


def test_outlier_exposure_loss_trains_only_the_heads_and_decreases():
    model = tiny(scoring="outlier_exposure").train()
    x = images(6)
    x[3:, :, 8:24, 8:24] += 3.0  # toy anomalies: a bright square
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    stats = model.encoder.stem[0][1].running_mean.clone()
    optimiser = torch.optim.Adam(model.oe_heads.parameters(), lr=1e-2)
    history = []
    for _ in range(30):
        losses = model.outlier_exposure_loss(x, labels)
        optimiser.zero_grad()
        losses["loss"].backward()
        optimiser.step()
        history.append(losses["loss"].item())
    assert all(math.isfinite(v) for v in history) and history[-1] < 0.7 * history[0]
    torch.testing.assert_close(losses["loss"], losses["normal"] + losses["anomalous"])
    assert all(p.grad is None for p in model.encoder.parameters())
    assert torch.equal(stats, model.encoder.stem[0][1].running_mean), "stage 2 must not touch BN statistics"
    assert model.encoder.training, "the encoder's mode is restored"


def test_config_is_checked():
    with pytest.raises(ValueError, match="memory_sizes"):
        tiny(memory_sizes=(16,))
    with pytest.raises(ValueError, match="scoring"):
        tiny(scoring="supervised")
    with pytest.raises(ValueError, match="memory_stages"):
        tiny(memory_stages=(4, 3))


@pytest.mark.parametrize("scoring", ["one_class", "outlier_exposure"])
def test_exports_to_torchscript_and_onnx_with_dynamic_batch(scoring, tmp_path):
    assert_exports_match(tiny(scoring=scoring), images(2), images(3, seed=5), tmp_path)
