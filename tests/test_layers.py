"""Imports go one way: capture → IR → taylor → passes → codegen → applications → faces."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jetgraph"
LAYERS = {
    "errors": 0, "capture": 1, "ir": 2, "taylor": 3, "passes": 4, "codegen": 5, "applications": 6,
    "api": 7, "viz": 7, "cli": 7, "demo": 7,
}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "jetgraph" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    name = "jetgraph." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    own = layer_of(name)
    if own is None:
        return
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        for target in targets:
            other = layer_of(target)
            assert other is None or other <= own, f"{name} (layer {own}) imports {target} (layer {other})"
