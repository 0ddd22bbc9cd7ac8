"""Model registry: build any model from a name plus a typed config.

Modelled on timm's ``register_model``: each architecture module decorates a factory that takes its
config dataclass. ``create(name, **overrides)`` fills the dataclass (unknown keys are an error, so a
typo in a config file fails loudly) and calls the factory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from mnemo.config_values import coerce


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type
    factory: Callable[[Any], nn.Module]
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, config_cls: type, description: str) -> Callable:
    """Decorator for a factory ``fn(config) -> AnomalyModel`` registered under ``name``."""

    def wrap(factory: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, config_cls, factory, description)
        return factory

    return wrap


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def make_config(name: str, **overrides: Any) -> Any:
    """The model's config dataclass with ``overrides`` applied; rejects unknown fields."""
    cls = get_entry(name).config_cls
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - set(types))
    if unknown:
        raise TypeError(f"{name}: unknown config field(s) {unknown}; valid fields: {sorted(types)}")
    # Lists from YAML/JSON become tuples so configs stay hashable and compare equal after a round trip;
    # numbers YAML left as text ("1e-2") become the field's type.
    clean = {
        key: tuple(value) if isinstance(value, list) else coerce(value, types[key], f"{name}.{key}")
        for key, value in overrides.items()
    }
    return cls(**clean)


def create(name: str, **overrides: Any) -> nn.Module:
    """Build model ``name`` with its default config updated by ``overrides``."""
    config = make_config(name, **overrides)
    model = get_entry(name).factory(config)
    model.model_name = name
    return model
