"""The package layout: which area may import which, checked on the source (function-level
imports included), so an import cycle between areas cannot creep in."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import repghost

PACKAGE = Path(repghost.__file__).parent

# Each area and the areas it may import. Lower layers never import higher ones.
ALLOWED: Dict[str, Set[str]] = {
    "reparam": set(),
    "files": set(),
    "models": {"reparam"},
    "checkpoint": {"models", "reparam", "files"},
    "create": {"models", "reparam", "checkpoint"},
    "training": {"models", "reparam", "checkpoint", "create", "files"},
    "deploy": {"models", "reparam", "checkpoint", "create", "files", "training"},
    "detection": {"models", "reparam", "checkpoint", "create", "files", "training", "deploy"},
    "bench": {"models", "reparam", "checkpoint", "create", "files", "deploy", "detection"},
    "demo": {"models", "reparam", "checkpoint", "create", "files", "training", "deploy", "bench"},
    "ablation": {"models", "reparam", "checkpoint", "create", "files", "training", "deploy", "detection", "bench"},
    "cli": {"models", "reparam", "checkpoint", "create", "files", "training", "deploy", "detection", "bench", "demo", "ablation"},
}


# The only imports of a higher area allowed, each inside a function (never at module level, so no
# import cycle can form): reparam.deploy_copy hands detectors to detection.fold_detector.
LAZY_UPWARD: Dict[str, Set[str]] = {"reparam.py": {"detection"}}


def _area(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem not in ("__init__", "__main__") else ""


def _imported_areas(path: Path, *, top_level_only: bool = False) -> Set[str]:
    """Areas of repghost imported anywhere in a file (relative or absolute imports); with
    ``top_level_only``, only the imports at module level."""
    rel = path.relative_to(PACKAGE)
    here = list(rel.parts[:-1])  # the package the file is in, relative to repghost
    found: Set[str] = set()
    tree = ast.parse(path.read_text())
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                parts = base + (node.module.split(".") if node.module else [])
                if parts:
                    found.add(parts[0])
                else:  # "from . import x" at the top of the package
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "repghost":
                parts = node.module.split(".")[1:]
                if parts:
                    found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "repghost" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_every_area_imports_only_the_areas_below_it():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        area = _area(path)
        if not area:  # repghost/__init__.py and __main__.py re-export the public API
            continue
        assert area in ALLOWED, f"{path}: a new area {area!r}; add it to ALLOWED with the areas it may use"
        lazy = LAZY_UPWARD.get(str(path.relative_to(PACKAGE)), set())
        for other in _imported_areas(path) - {area}:
            if other not in ALLOWED[area] and other not in lazy:
                violations.append(f"{path.relative_to(PACKAGE)} ({area}) imports {other}")
        for other in _imported_areas(path, top_level_only=True) & lazy:
            violations.append(f"{path.relative_to(PACKAGE)} ({area}) imports {other} at module level")
    assert violations == []


def test_the_rules_themselves_have_no_cycle():
    order = list(ALLOWED)  # listed bottom-up: every allowed import points to an earlier area
    for area, deps in ALLOWED.items():
        assert all(order.index(d) < order.index(area) for d in deps), area


def test_the_public_api_is_where_it_was():
    for name in ("create_model", "list_models", "reparameterize_model", "load_checkpoint", "save_checkpoint", "model_form"):
        assert callable(getattr(repghost, name))
