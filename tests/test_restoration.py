"""The restoring memory UNet (``restore``): synthetic anomalies, SSIM, and what the model learns from them."""

from __future__ import annotations

import pytest
import torch

from mnemo import models
from mnemo.models.anomaly_synthesis import (
    MATERIALS,
    blotch_material,
    fractal_noise,
    perlin_masks,
    polyline_masks,
    rescaled,
    synthesize,
)
from mnemo.models.structural import SSIMMap
from tests.conftest import TINY_CONFIGS


def _good_batch(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Striped 'parts' with noise: a texture with structure, in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    stripes = (torch.arange(size) % 8 < 2).float().view(1, 1, size, 1) * 0.3 + 0.4
    return (
        (stripes + 0.05 * torch.randn(n, 1, size, size, generator=gen)).clamp(0, 1).expand(n, 1, size, size)
    )


def test_synthesis_is_deterministic_for_a_seed_and_differs_across_seeds():
    x = _good_batch()
    a = synthesize(x, torch.Generator().manual_seed(3), share=1.0)
    b = synthesize(x, torch.Generator().manual_seed(3), share=1.0)
    c = synthesize(x, torch.Generator().manual_seed(4), share=1.0)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize(
    ("seed", "materials", "channels"),
    [(s, MATERIALS, 1) for s in range(5)] + [(5, (m,), 3) for m in MATERIALS],
)
def test_synthesis_masks_mark_exactly_the_changed_pixels(seed, materials, channels):
    x = _good_batch(8, 48, seed).expand(8, channels, 48, 48)
    gen = torch.Generator().manual_seed(seed)
    out, mask = synthesize(x, gen, share=1.0, min_change=0.02, materials=materials)
    change = (out - x).abs().amax(dim=1, keepdim=True)
    assert mask.shape == (8, 1, 48, 48) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (change[mask == 1] >= 0.02).all()
    assert (change[mask == 0] < 0.02).all()
    assert mask.sum() > 0, "share=1 must corrupt something"
    assert out.min() >= 0 and out.max() <= 1


def test_rescaled_material_is_the_surface_at_another_scale():
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(64, 1, 32, 32).contiguous()
    out = rescaled(ramp, torch.Generator().manual_seed(0))
    slopes = out.diff(dim=-1).abs().mean(dim=(1, 2, 3)) / ramp.diff(dim=-1).mean()
    zoomed_in, zoomed_out = slopes < 0.75, slopes > 1.5  # half the slope, or twice it (mirrored halves)
    assert out.shape == ramp.shape and (zoomed_in | zoomed_out).all()
    assert zoomed_in.any() and zoomed_out.any()


def test_noise_material_is_foreign_matter_in_range_and_seeded():
    a = fractal_noise(4, 3, 32, torch.Generator().manual_seed(1))
    b = fractal_noise(4, 3, 32, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.shape == (4, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert (a.std(dim=(1, 2, 3)) > 0).all()
    torch.testing.assert_close(a[:, 0], a[:, 2])  # grey matter on every channel


def test_blotch_material_draws_each_named_material_and_refuses_unknown_names():
    other = _good_batch(32, 32)
    out = blotch_material(other, torch.Generator().manual_seed(0), ("image", "noise"))
    same = (out == other).flatten(1).all(dim=1)
    assert same.any() and (~same).any()
    assert torch.equal(blotch_material(other, torch.Generator(), ("image",)), other)
    with pytest.raises(ValueError, match="materials must be names from"):
        blotch_material(other, torch.Generator(), ("dtd",))
    with pytest.raises(ValueError, match="synth_materials"):
        models.make_config("restore", synth_materials=("dtd",))


def test_share_zero_leaves_the_batch_untouched():
    x = _good_batch()
    out, mask = synthesize(x, torch.Generator().manual_seed(0), share=0.0)
    torch.testing.assert_close(out, x)
    assert mask.sum() == 0


def test_synthesis_paints_about_share_of_the_batch_and_leaves_the_rest_untouched():
    # Noisy mid-grey parts: every draw changes some pixel past min_change, so a painted image always has
    # a mask (on near-white parts a faint draw can stay below it: changed, yet unmasked by design).
    x = _good_batch(64, 32)
    out, mask = synthesize(x, torch.Generator().manual_seed(0), share=0.5)
    painted = mask.flatten(1).any(dim=1)
    assert 16 <= int(painted.sum()) <= 48  # Binomial(64, 0.5) far outside its bulk would be a bug
    torch.testing.assert_close(out[~painted], x[~painted], rtol=0, atol=0)
    changed = (out - x).abs().amax(dim=1, keepdim=True) >= 0.02
    assert torch.equal(changed, mask.bool())


def test_mask_shapes_cover_plausible_areas():
    gen = torch.Generator().manual_seed(0)
    blotch = perlin_masks(16, 64, gen).mean(dim=(1, 2, 3))
    assert ((blotch > 0.01) & (blotch < 0.2)).all()
    lines = polyline_masks(16, 64, gen).mean(dim=(1, 2, 3))
    assert ((lines > 0) & (lines < 0.1)).all()  # thin strokes


def test_ssim_is_one_for_identical_images_and_drops_where_they_differ():
    x = _good_batch(2, 32)
    ssim_map = SSIMMap(1)
    torch.testing.assert_close(ssim_map(x, x), torch.ones(2, 1, 32, 32), atol=1e-5, rtol=0)
    y = x.clone()
    y[:, :, 8:16, 8:16] = 1.0 - y[:, :, 8:16, 8:16]
    sim = ssim_map(x, y)
    assert sim[:, :, 10:14, 10:14].max() < 0.5 and sim[:, :, 28:, 28:].min() > 0.99


def test_config_rejects_unknown_or_repeated_score_maps_and_even_pools():
    for bad in (("max",), (), ("ssim", "ssim")):
        with pytest.raises(ValueError, match="score_maps"):
            models.create("restore", score_maps=bad)
    with pytest.raises(ValueError, match="score_pool"):
        models.create("restore", score_pool=4)
    with pytest.raises(ValueError, match="standardize"):
        models.create("restore", score_maps=("ssim", "intensity"), standardize=False)


@pytest.mark.parametrize(
    "score_maps", [("segment",), ("ssim",), ("l2",), ("intensity",), ("segment", "ssim", "l2", "intensity")]
)
def test_every_score_map_scores_and_exports_with_its_fitted_statistics(score_maps, tmp_path):
    from tests.export_check import assert_exports_match

    torch.manual_seed(0)
    model = models.create("restore", **{**TINY_CONFIGS["restore"], "score_maps": score_maps})
    assert (model.head is not None) == ("segment" in score_maps)
    x = _good_batch(3, model.config.image_size) * 2 - 1  # the default normalisation: mean 0.5, std 0.5
    model.after_fit([_good_batch(4, model.config.image_size, seed=s) * 2 - 1 for s in (1, 2)])
    assert model.map_mean.abs().sum() > 0, "fitted statistics must be in the exported graph"
    assert_exports_match(model, x[:2], x, tmp_path)


def test_map_statistics_are_each_cues_mean_and_moderated_std_at_every_position():
    from mnemo.models.restoration import PRIOR_IMAGES

    torch.manual_seed(0)
    model = models.create("restore", **TINY_CONFIGS["restore"]).eval()
    images = [_good_batch(3, 32, seed=s) * 2 - 1 for s in range(3)]
    with pytest.raises(ValueError, match="not fitted"):
        model.export_facts()
    assert model.fit_map_statistics(images) == 9
    with torch.no_grad():
        maps = model.cue_maps(torch.cat(images))
    assert model.map_mean.shape == (1, len(model.config.score_maps), 32, 32)
    torch.testing.assert_close(model.map_mean, maps.mean(dim=0, keepdim=True), atol=1e-6, rtol=1e-5)
    var = maps.var(dim=0, keepdim=True)
    moderated = (8 * var + PRIOR_IMAGES * var.mean(dim=(2, 3), keepdim=True)) / (8 + PRIOR_IMAGES)
    torch.testing.assert_close(model.map_std, moderated.sqrt(), atol=1e-6, rtol=1e-4)
    assert model.export_facts() == {"map_stats_images": 9.0}
    with pytest.raises(ValueError, match="at least 2"):
        model.fit_map_statistics(iter(()))


def test_standardised_heatmap_is_the_sum_of_per_position_z_scores():
    """A position that is always unusual on good parts (a fixture edge) is quiet once standardised; the
    two-sided ``intensity`` cue counts its z-score folded (|z| on the half-normal's scale)."""
    from mnemo.models.restoration import STD_FLOOR, folded

    torch.manual_seed(0)
    model = models.create("restore", **TINY_CONFIGS["restore"]).eval()
    assert model.config.score_maps == ("segment", "ssim", "intensity")
    x = _good_batch(2, 32, seed=5) * 2 - 1
    with torch.no_grad():
        raw = model.cue_maps(x)
        _, unfitted = model.score(x)
        torch.testing.assert_close(unfitted, raw[:, :2].sum(dim=1, keepdim=True) + folded(raw[:, 2:]))
        model.map_mean.copy_(raw.mean(dim=0, keepdim=True))
        model.map_std.fill_(0.5)
        _, heat = model.score(x)
    z = (raw - raw.mean(dim=0, keepdim=True)) / (0.5 + STD_FLOOR)
    torch.testing.assert_close(heat, z[:, :2].sum(dim=1, keepdim=True) + folded(z[:, 2:]))
    two_cues = {**TINY_CONFIGS["restore"], "score_maps": ("segment", "ssim")}
    raw_only = models.create("restore", **two_cues, standardize=False).eval()
    with torch.no_grad():
        plain = raw_only.cue_maps(x)
        torch.testing.assert_close(raw_only.score(x)[1], plain.sum(dim=1, keepdim=True))
    assert raw_only.export_facts() is None
    with pytest.raises(ValueError, match="standardize"):
        models.create("restore", standardize=False)  # a raw brightness is no anomaly score


def test_intensity_cue_flags_a_soft_stain_brighter_or_darker_than_good_parts():
    """What a restorer copies through its skips: a soft-edged brightness change. The intensity cue alone
    (no training: it reads the input and the good images' statistics) finds both signs of it."""
    torch.manual_seed(0)
    model = models.create("restore", **{**TINY_CONFIGS["restore"], "score_maps": ("intensity",)}).eval()
    model.fit_map_statistics([_good_batch(16, 32, seed=s) * 2 - 1 for s in range(4)])
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    stain = torch.exp(-((yy - 12) ** 2 + (xx - 20) ** 2) / (2 * 4.0**2))  # soft, no edge to see
    part = _good_batch(2, 32, seed=9)
    stained = (part + torch.tensor([0.25, -0.25]).view(2, 1, 1, 1) * stain).clamp(0, 1)
    with torch.no_grad():
        _, clean_heat = model.score(part * 2 - 1)
        _, heat = model.score(stained * 2 - 1)
    inside, outside = stain > 0.5, stain < 0.05
    for i in range(2):
        assert heat[i, 0][inside].mean() > heat[i, 0][outside].mean() + 2
        assert heat[i, 0][inside].mean() > clean_heat[i, 0][inside].mean() + 2


def test_training_teaches_the_head_where_synthetic_anomalies_are():
    """A few hundred steps on striped parts: a painted blotch scores above the clean part."""
    torch.manual_seed(0)
    model = models.create("restore", **TINY_CONFIGS["restore"])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    good = _good_batch(32, model.config.image_size, seed=1) * 2 - 1
    model.train()
    for _ in range(150):
        x = good[torch.randperm(32)[:8]]
        loss = model.loss(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = _good_batch(4, model.config.image_size, seed=9)
    bad = test.clone()
    bad[:, :, 10:20, 12:22] = 0.0  # a dark blotch
    with torch.no_grad():
        s_good, _ = model.score(test * 2 - 1)
        s_bad, heat = model.score(bad * 2 - 1)
    assert s_bad.min() > s_good.max()
    assert heat[:, :, 10:20, 12:22].mean() > heat[:, :, :, 26:].mean()
