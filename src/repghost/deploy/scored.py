"""An exported or int8 file (ONNX, MNN, ExecuTorch) behind the ``nn.Module`` interface, so
``repghost eval`` scores it with the same code as a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..files import PathLike
from .quantize import _integer_ops, _run_all, _warn_if_saturates, onnx_metadata, sidecar_path
from .runtimes import load_runner

__all__ = ["RunnerModel"]


class RunnerModel(nn.Module):
    """An exported file (ONNX, MNN, ExecuTorch) behind the ``nn.Module`` interface, so the evaluation
    code can score it.

    Runs every image of a batch through the file's runtime (files are exported at batch 1) and
    returns the logits as a tensor. ``eval_transform`` and ``num_classes`` come from what
    ``repghost quantize`` stored: the ONNX file's metadata, or the ``FILE.json`` beside an MNN or
    ExecuTorch file (:func:`sidecar_path`).
    """

    FORMATS = {".onnx": "onnx", ".mnn": "mnn", ".pte": "executorch"}
    RUNTIME_NAMES = {"onnx": "onnxruntime", "mnn": "MNN", "executorch": "ExecuTorch"}

    def __init__(self, run: Any, *, num_classes: int, eval_transform: Mapping[str, Any], form: str, fmt: str = "onnx") -> None:
        super().__init__()
        self.run = run
        self.fmt = fmt
        self.runtime = self.RUNTIME_NAMES[fmt]
        self.num_classes = num_classes
        self.eval_transform = dict(eval_transform)
        self.form = form

    @classmethod
    def from_file(cls, path: PathLike) -> "RunnerModel":
        fmt = cls.FORMATS.get(Path(path).suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: not a file a runtime scores here; expected one of {', '.join(cls.FORMATS)}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        meta = onnx_metadata(path) if fmt == "onnx" else {}
        side = sidecar_path(path)
        if "num_classes" not in meta and side.is_file():
            meta = {k: json.dumps(v) for k, v in json.loads(side.read_text()).items()}
        if "num_classes" not in meta:
            raise ValueError(
                f"{path}: records no class count or eval transform (ONNX metadata, or {side.name} beside the file); "
                "`repghost eval` scores files written by `repghost quantize` (or evaluate the checkpoint it came from)"
            )
        # Only quantize writes MNN/ExecuTorch sidecars, so those files are int8; ONNX ones say so by their ops.
        form = "int8" if fmt != "onnx" or _integer_ops(str(path)) else "onnx"
        if fmt == "onnx" and form == "int8":
            _warn_if_saturates(path)
        return cls(load_runner(path, fmt), num_classes=int(json.loads(meta["num_classes"])),
                   eval_transform=json.loads(meta.get("eval_transform", "{}")), form=form, fmt=fmt)

    from_onnx = from_file  # the name this had when only ONNX files were scored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(_run_all(self.run, x.contiguous()))
