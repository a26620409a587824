"""repghost: RepGhostNet (arXiv 2211.06088) models, re-parameterization, checkpoints and tools."""

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .models import RepGhostConfig, RepGhostFeatures, RepGhostNet, create_model, list_models
from .reparam import is_reparameterized, reparameterize_model

__version__ = "0.1.0"

__all__ = [
    "create_model",
    "list_models",
    "reparameterize_model",
    "is_reparameterized",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "CheckpointError",
    "RepGhostConfig",
    "RepGhostNet",
    "RepGhostFeatures",
    "__version__",
]
