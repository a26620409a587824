"""Checkpoints: read every layout found in the wild, load with clear errors, save safetensors.

* :mod:`.layouts` -- key layouts, renaming, what names and tensors say (pure: no files, no models).
* :mod:`.resolve` -- the configuration of the model a checkpoint holds (:func:`resolve_config`).
* :mod:`.files` -- reading files safely (safetensors, weights-only pickles) and saving.
* :mod:`.load` -- loading into a model with fit checks, building the model a file holds.
"""

from .errors import CheckpointError
from .files import EVAL_TRANSFORM_KEY, FORMAT_NAME, FORMAT_VERSION, Checkpoint, read_checkpoint, read_weights, save_checkpoint
from .layouts import VARIANT_OPTIONS, detect_layout, parse_model_name, to_repghost_names
from .resolve import infer_config, resolve_config
from .load import LoadReport, load_checkpoint, model_from_checkpoint

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "LoadReport",
    "read_checkpoint",
    "read_weights",
    "detect_layout",
    "load_checkpoint",
    "save_checkpoint",
    "infer_config",
    "resolve_config",
    "model_from_checkpoint",
    "parse_model_name",
    "to_repghost_names",
    "VARIANT_OPTIONS",
    "EVAL_TRANSFORM_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
]
