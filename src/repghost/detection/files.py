"""Detector files: safetensors with the detector's config and categories, and reading them back.

A detector file rebuilds its detector with no other input: the metadata records the
:class:`DetectorConfig`, the categories (the annotation file's ids and names) and the form
(``train`` or ``deploy``). ``repghost detect train``'s ``last.pth`` is read too
(``torch.load(weights_only=True)``: nothing pickled runs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import CheckpointError
from ..files import PathLike, atomic_write
from .data import CategoryMap
from .models import DetectorConfig, build_detector, fold_detector

__all__ = ["DETECTOR_FORMAT", "save_detector", "load_detector", "categories_to_dict", "categories_from_dict"]

DETECTOR_FORMAT = "repghost-detector"


def categories_to_dict(cats: CategoryMap) -> Dict[str, Any]:
    return {"ids": list(cats.ids), "names": list(cats.names)}


def categories_from_dict(data: Mapping[str, Any]) -> CategoryMap:
    return CategoryMap(tuple(int(i) for i in data["ids"]), tuple(str(n) for n in data["names"]))


def save_detector(model: nn.Module, path: PathLike, *, categories: CategoryMap, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the detector's weights and what rebuilds it, atomically."""
    from safetensors.torch import save_file

    cfg: DetectorConfig = model.detector_config
    meta = {
        "format": DETECTOR_FORMAT,
        "form": "deploy" if not any(isinstance(m, _BatchNorm) for m in model.backbone.body.modules()) else "train",
        "detector_config": cfg.to_json(),
        "categories": json.dumps(categories_to_dict(categories)),
    }
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _read(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        if meta.get("format") != DETECTOR_FORMAT:
            raise CheckpointError(
                f"{path}: not a repghost detector file (its metadata names no detector); detector files "
                "are written by `repghost detect train` (best.safetensors, deploy.safetensors)"
            )
        info = {"form": meta.get("form", "train"), "detector_config": json.loads(meta["detector_config"]), "categories": json.loads(meta["categories"])}
        return tensors, info
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means: not a file this project wrote
        raise CheckpointError(f"{path}: cannot be read as a detector checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "detector_config" not in state or "model" not in state:
        raise CheckpointError(
            f"{path}: not a `repghost detect train` checkpoint (no detector_config); pass a run's "
            "last.pth/best.pth or a detector .safetensors file"
        )
    return state["model"], {"form": "train", "detector_config": state["detector_config"], "categories": state["categories"]}


def load_detector(path: PathLike, *, map_location: str = "cpu") -> Tuple[nn.Module, CategoryMap, str]:
    """``(detector in eval mode, categories, form)`` from a detector file or training checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    tensors, info = _read(p)
    cfg = DetectorConfig.from_dict(info["detector_config"])
    model = build_detector(cfg)
    if info["form"] == "deploy":
        fold_detector(model, cfg.backbone, inplace=True)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: its weights do not fit the {cfg.kind}/{cfg.backbone} detector it records "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    return model.to(map_location).eval(), categories_from_dict(info["categories"]), info["form"]
