"""The Mnemo model zoo: memory-augmented autoencoders behind one scoring contract.

import models
model = models.create("memorizer", memory_size=8)
score, heatmap = model.eval().score(x)      # x: [B, C, H, W] in the model's normalisation
"""

from models import anomem, autoencoder, daad  # noqa: F401  (registers the models)
from models.base import AnomalyModel, ModelConfig, ReconstructionModel
from models.registry import create, get_entry, list_models, make_config, register_model

__all__ = [
    "AnomalyModel",
    "ModelConfig",
    "ReconstructionModel",
    "create",
    "get_entry",
    "list_models",
    "make_config",
    "register_model",
]
