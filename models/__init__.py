"""The Mnemo model zoo: memory-augmented autoencoders behind one scoring contract.

from mnemo import models
model = models.create("memorizer", memory_size=8)
score, heatmap = model.eval().score(x)      # x: [B, C, H, W] in the model's normalisation
"""

from mnemo.models import anomem, autoencoder, daad, restoration  # noqa: F401  (registers the models)
from mnemo.models.base import AnomalyModel, ModelConfig, ReconstructionModel
from mnemo.models.registry import create, get_entry, list_models, make_config, register_model

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
