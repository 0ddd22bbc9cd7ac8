"""The scoring contract, checked on every registered model: shapes, gradients, determinism, export."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mnemo import models
from mnemo.training.config import OptimConfig
from tests.conftest import TINY_CONFIGS, batch_for, tiny_model
from tests.export_check import assert_exports_match

EXPECTED = {"ae", "memae", "memorizer", "rftm", "daad", "daad_plus", "anomem", "restore"}
FITTED_AFTER_TRAINING = {"daad_plus", "restore"}  # after_fit measures statistics on training images


def test_registry_lists_every_model_with_a_description():
    assert set(models.list_models()) >= EXPECTED
    for name in models.list_models():
        assert models.get_entry(name).description


def test_every_model_has_a_tiny_test_config():
    assert set(models.list_models()) <= set(TINY_CONFIGS)


def test_create_rejects_unknown_names_and_fields():
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        models.create("nope")
    with pytest.raises(TypeError, match="unknown config field"):
        models.create("memae", memory_sise=3)


def test_create_applies_overrides_and_keeps_a_typed_config():
    model = models.create("memorizer", memory_size=8, hidden_dims=[32, 16])
    assert model.config.memory_size == 8 and model.config.hidden_dims == (32, 16)
    assert dataclasses.asdict(model.config)["rounds"] == 8
    assert model.model_name == "memorizer"


def test_numbers_yaml_left_as_text_take_the_field_type():
    """``--set model_config.shrink_threshold=1e-2`` reaches make_config as the string '1e-2' (YAML 1.1)."""
    config = models.make_config("memae", shrink_threshold="1e-2", memory_size="50")
    assert config.shrink_threshold == 0.01 and config.memory_size == 50
    assert models.make_config("memae", shrink_threshold=None).shrink_threshold is None
    with pytest.raises(ValueError, match=r"memae\.shrink_threshold must be float"):
        models.make_config("memae", shrink_threshold="lots")


def test_score_shapes(model_name):
    model = tiny_model(model_name).eval()
    x = batch_for(model, 3)
    with torch.no_grad():
        score, heat = model.score(x)
    assert score.shape == (3,)
    assert heat.shape == (3, 1, x.shape[2], x.shape[3])
    assert torch.isfinite(score).all() and torch.isfinite(heat).all()


def test_training_loss_is_finite_and_reaches_the_encoder_through_the_memory(model_name):
    model = tiny_model(model_name).train()
    losses = model.loss(batch_for(model, 4))
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    first = next(p for n, p in model.named_parameters() if "enc" in n or "backbone" in n or "stem" in n)
    assert first.grad is not None and first.grad.abs().sum() > 0, "no gradient reached the encoder"


def test_same_seed_gives_the_same_model_and_scores(model_name):
    a, b = tiny_model(model_name, seed=7).eval(), tiny_model(model_name, seed=7).eval()
    x = batch_for(a)
    with torch.no_grad():
        for ta, tb in zip(a.score(x), b.score(x)):
            torch.testing.assert_close(ta, tb)
    c = tiny_model(model_name, seed=8).eval()
    with torch.no_grad():
        assert not torch.allclose(a.score(x)[0], c.score(x)[0])


def test_eval_scores_do_not_depend_on_batch_mates(model_name):
    model = tiny_model(model_name).eval()
    x = batch_for(model, 4)
    with torch.no_grad():
        full, _ = model.score(x)
        alone, _ = model.score(x[:1])
    torch.testing.assert_close(full[:1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_name", sorted(FITTED_AFTER_TRAINING))
def test_after_fit_statistics_do_not_depend_on_the_batch_size(model_name):
    """Training scores its images in larger batches than it trains (training.run.scoring_batch_size)."""
    x = batch_for(tiny_model(model_name), 6)
    whole, one_by_one = tiny_model(model_name).eval(), tiny_model(model_name).eval()
    whole.after_fit(iter([x]))
    one_by_one.after_fit(iter(x.split(1)))
    facts, expected = whole.export_facts(), one_by_one.export_facts()
    assert facts.keys() == expected.keys()
    for key in facts:
        assert facts[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(whole.score(x)[0], one_by_one.score(x)[0], atol=1e-5, rtol=1e-4)


def test_scoring_batch_size_fills_about_a_million_values_within_256_and_the_training_batch():
    from mnemo.training.run import scoring_batch_size

    def size(train_batch: int, **config) -> int:
        return scoring_batch_size(models.create("daad", **config), train_batch)

    assert size(8, in_channels=1, image_size=32) == 256  # one-class MNIST at paper 003's batch 8
    assert size(8, in_channels=1, image_size=128) == 64
    assert size(8, in_channels=3, image_size=256) == 8  # never below the training batch
    assert size(512, in_channels=1, image_size=32) == 512


def test_scoring_exports_to_torchscript_and_onnx_with_dynamic_batch(model_name, tmp_path):
    model = tiny_model(model_name)
    assert_exports_match(model, batch_for(model, 2), batch_for(model, 3, seed=5), tmp_path)


def test_training_hooks_default_to_one_optimiser_and_nothing_after_training(model_name):
    """Only DAAD+ trains with two optimisers; DAAD+ and restore fit statistics after training (after_fit)."""
    model = tiny_model(model_name)
    optimizers = model.configure_optimizers(OptimConfig(lr=1e-3))
    assert len(optimizers) == (2 if model_name == "daad_plus" else 1)
    logs = model.training_step(batch_for(model, 4), optimizers)
    assert set(model.loss(batch_for(model, 4))) <= set(logs)
    assert ("d_loss" in logs) == (model_name == "daad_plus")
    if model_name not in FITTED_AFTER_TRAINING:
        model.after_fit(iter(()))  # the default never reads the batches
        assert model.export_facts() is None
    else:  # they need images, and refuse to export before they have seen them
        with pytest.raises(ValueError):
            model.after_fit(iter(()))
        with pytest.raises(ValueError, match="not fitted"):
            model.export_facts()


def test_example_reconstruction_is_the_reconstruction_or_none(model_name):
    model = tiny_model(model_name).eval()
    x = batch_for(model, 2)
    with torch.no_grad():
        shown = model.example_reconstruction(x)
    if isinstance(model, models.ReconstructionModel) or model_name == "restore":
        assert shown is not None and shown.shape == x.shape
    else:
        assert shown is None
