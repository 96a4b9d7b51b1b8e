"""Imports go one way: IR → taylor → capture → passes → codegen → applications → faces.

The data flows model → capture → IR → passes → codegen; the imports follow what each layer
needs: the frontend (capture) builds the IR and lowers graphs to the op set the Taylor rules
cover, so it sits above both, and the Taylor layer knows nothing of capture.

What counts as importing what (static, from the source):

- ``import jetgraph.x.y`` and ``from jetgraph.x.y import z`` depend on layer ``x``.
- ``import jetgraph`` and ``from jetgraph import NAME`` depend on the package namespace, which
  jetgraph/__init__.py fills from every layer up to the faces: they count as the top layer, so
  only a face may use them. The one exception is ``from jetgraph import MODULE`` where MODULE is
  itself a submodule or subpackage of jetgraph (``from jetgraph import errors``, ``from jetgraph
  import capture``: the callable capture package): that names the submodule, and counts as its
  layer, unless jetgraph/__init__.py rebinds the name (``from jetgraph import lens`` gives the
  entry point, not a module). ``from jetgraph import __version__`` therefore counts as the top
  layer: a lower layer imports it from ``jetgraph._version`` (layer 0).
- Relative imports (``from . import x``, ``from ..passes import y``) are resolved first.

(At run time importing any jetgraph submodule first runs jetgraph/__init__.py; the rule is about
which names a module depends on, so that each layer can be read, tested and replaced without the
ones above it.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jetgraph"
LAYERS = {
    # leaves, importing at most each other: errors, file writing, version, cost estimates, data,
    # precision, attention masks
    "errors": 0, "files": 0, "_version": 0, "cost": 0, "data": 0, "precision": 0, "padding": 0,
    "ir": 1, "heads": 1, "taylor": 2, "capture": 3, "passes": 4, "codegen": 5, "applications": 6,
    "viz": 7, "cli": 7, "demo": 7, "__main__": 7,
}
TOP = max(LAYERS.values())  # the package namespace (jetgraph/__init__.py) re-exports the faces


def layer_of(module: str) -> int | None:
    """The layer of a module named ``jetgraph.<x>…``: TOP for the package itself, None outside
    jetgraph (and for a jetgraph module missing from LAYERS, which test_every_module_has_a_layer
    reports)."""
    parts = module.split(".")
    if parts[0] != "jetgraph":
        return None
    if len(parts) == 1:
        return TOP
    return LAYERS.get(parts[1])


def _bound_in_package() -> set[str]:
    """Names jetgraph/__init__.py binds itself (``lens`` there is the entry point)."""
    names = set()
    for node in ast.parse((PACKAGE / "__init__.py").read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


BOUND = _bound_in_package()


def is_submodule(name: str) -> bool:
    """Whether ``from jetgraph import <name>`` gives the submodule or subpackage jetgraph.<name>
    (one that exists, and that jetgraph/__init__.py does not rebind)."""
    exists = (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()
    return exists and name not in BOUND


def imported_modules(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every jetgraph module (or the package) that ``source``, the text of ``module``, depends on,
    by the rules in this file's docstring."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base == "jetgraph":
                for alias in node.names:
                    found.append(f"jetgraph.{alias.name}" if is_submodule(alias.name) else "jetgraph")
            else:
                found.append(base)
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    assert own is not None, f"{module} has no layer"
    return [f"{module} (layer {own}) imports {target} (layer {layer_of(target)})"
            for target in imported_modules(module, source, is_package)
            if layer_of(target) is not None and layer_of(target) > own]


def modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("jetgraph", *parts))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    found = violations(module_name(path), path.read_text(), is_package=path.name == "__init__.py")
    assert not found, "\n".join(found)


def test_every_module_has_a_layer() -> None:
    """A new top-level module must be placed in LAYERS, or it would escape the check."""
    unplaced = sorted({module_name(p) for p in modules() if layer_of(module_name(p)) is None})
    assert not unplaced, f"add these to LAYERS in tests/test_layers.py: {unplaced}"


@pytest.mark.parametrize(("module", "source", "is_package", "expected", "violates"), [
    ("jetgraph.codegen.source", "from jetgraph import __version__", False, ["jetgraph"], True),
    ("jetgraph.passes.rewrite", "import jetgraph", False, ["jetgraph"], True),
    ("jetgraph.taylor.api", "def f():\n    from jetgraph import capture\n", False,
     ["jetgraph.capture"], True),
    ("jetgraph.ir", "from . import viz", False, ["jetgraph.viz"], True),
    ("jetgraph.passes.paths", "from ..codegen.trace import emit", False, ["jetgraph.codegen.trace"], True),
    ("jetgraph.capture", "from .lift import lift", True, ["jetgraph.capture.lift"], False),
    ("jetgraph.codegen.source", "from jetgraph import errors\nfrom jetgraph._version import __version__\n"
     "import jetgraph.passes.rewrite", False,
     ["jetgraph.errors", "jetgraph._version", "jetgraph.passes.rewrite"], False),
    ("jetgraph.passes.paths", "from jetgraph import capture", False, ["jetgraph.capture"], False),
    ("jetgraph.passes.paths", "from jetgraph import lens", False, ["jetgraph"], True),  # the entry point
    ("jetgraph.cli", "import jetgraph\nfrom jetgraph import lens", False, ["jetgraph", "jetgraph"], False),
])
def test_the_check_itself(module: str, source: str, is_package: bool, expected: list[str],
                          violates: bool) -> None:
    """Bare package imports, imports inside functions and relative imports of a higher layer
    are reported; submodules of lower layers, and the package from a face, are not."""
    assert imported_modules(module, source, is_package) == expected
    assert bool(violations(module, source, is_package)) == violates


def test_every_module_is_importable_by_its_path() -> None:
    """No package attribute hides a submodule: ``jetgraph.capture.loading`` is the module, the
    callable package ``jetgraph.capture`` still captures, and each ``import a.b.c`` reaches c."""
    import importlib
    import sys

    for path in modules():
        name = module_name(path)
        module = importlib.import_module(name)
        parent, _, child = name.rpartition(".")
        if parent:
            assert getattr(sys.modules[parent], child) is module, f"{parent}.{child} is not the module {name}"
    import jetgraph

    assert callable(jetgraph.capture) and jetgraph.capture.loading.load_model is jetgraph.load_model


def test_the_taylor_layer_knows_nothing_of_capture() -> None:
    found = [f"{module_name(p)} imports {target}" for p in (PACKAGE / "taylor").rglob("*.py")
             for target in imported_modules(module_name(p), p.read_text(), p.name == "__init__.py")
             if target.startswith("jetgraph.capture")]
    assert not found, "\n".join(found)


def _documented_layers() -> dict[int, tuple[set[str], str]]:
    """The layer table of docs/architecture.md: layer -> (its `LAYERS` names, its modules cell)."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = text.split("| layer | `LAYERS` names | modules | job |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        layer = int(cells[0].split()[0])
        rows[layer] = (set(re.findall(r"`([^`]+)`", cells[1])), cells[2])
    return rows


def test_the_documented_layer_table_matches_the_code() -> None:
    """docs/architecture.md's layer table names every layer of LAYERS with its names, and every
    module of the package in its layer's row (by file name, or by its subpackage's folder)."""
    documented = _documented_layers()
    expected: dict[int, set[str]] = {}
    for name, layer in LAYERS.items():
        expected.setdefault(layer, set()).add(name)
    assert {layer: names for layer, (names, _) in documented.items()} == expected
    missing = []
    for path in modules():
        relative = path.relative_to(PACKAGE)
        if relative.name == "__init__.py":  # the package itself: its layer's name
            continue
        cell = documented[LAYERS[relative.parts[0].removesuffix(".py")]][1]
        folder = f"{relative.parent.name}/" if len(relative.parts) > 2 else None
        if f"`{relative.name}`" not in cell and relative.name not in re.findall(r"[\w.]+\.py", cell) \
                and not (folder and f"`{folder}`" in cell) and f"`{relative}`" not in cell:
            missing.append(str(relative))
    assert not missing, f"modules missing from docs/architecture.md's layer table: {missing}"
