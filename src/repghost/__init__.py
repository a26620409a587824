"""repghost: RepGhostNet (arXiv 2211.06088) models, re-parameterization, checkpoints and tools.

Layout: ``models/`` (architecture as data, modules, size), ``reparam`` (the folding math and the
one verb), ``checkpoint/`` (file layouts, reading, loading, saving), ``create`` (``create_model``),
``training/``, ``deploy/`` (export, conversion, verification), ``bench/`` (latency, RQ1),
``demo``, and ``cli/``, the only code that parses arguments or prints.
"""

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .create import create_model
from .models import RepGhostConfig, RepGhostFeatures, RepGhostNet, list_models
from .reparam import model_form, reparameterize_model

__version__ = "0.1.0"

__all__ = [
    "create_model",
    "list_models",
    "reparameterize_model",
    "model_form",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "CheckpointError",
    "RepGhostConfig",
    "RepGhostNet",
    "RepGhostFeatures",
    "__version__",
]
