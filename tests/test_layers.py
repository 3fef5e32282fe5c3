"""The package's import structure: no import cycles, no import that points up the layers, no module reading
another module's private names. The layer order is written down in docs/design.md §7.

Every import counts, including the lazy ones inside functions (they are cycles and upward references all the
same, only deferred); imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "antibody_fast"

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("", "_ext", "_io", "_rng", "dispatch", "guard", "distributed", "recipes", "testing")),
    ("kernels and ops", ("kernels", "ops")),
    ("plumbing", ("flat", "fsdp", "_model", "models", "models_gguf", "data", "reference")),
    ("steps", ("steps", "baselines")),
    ("services", ("checkpoint", "checkpoint_sharded", "evaluate", "integrations")),
    ("apps", ("cli", "bench", "demo", "info", "gpu_compile", "gpu_variants", "__main__")),
]


def _source_files() -> dict[str, Path]:
    """Module name -> file, for the package and for ``kernels/`` (installed as ``antibody_fast.kernels``)."""
    out: dict[str, Path] = {}
    for base, prefix in ((ROOT / PKG, PKG), (ROOT / "kernels", f"{PKG}.kernels")):
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = f
    return out


MODULES = _source_files()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _layer(mod: str) -> int:
    rest = mod[len(PKG) + 1 :] if mod != PKG else ""
    head = rest.split(".")[0]
    for i, (_, names) in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{mod} is in no layer: add its top-level name to LAYERS and to docs/design.md §7")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for sub in node.body:
                    skip.update(id(n) for n in ast.walk(sub))
    return skip


def _resolve(mod: str, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    base = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of an ``antibody_fast`` module."""
    tree = ast.parse(MODULES[mod].read_text(), filename=str(MODULES[mod]))
    skip = _type_checking_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == PKG]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            if not target or target.split(".")[0] != PKG:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:  # ``from pkg import submodule``
                    out.append((sub, None, node.lineno))
                else:
                    out.append((target, a.name, node.lineno))
    return [(t, n, line) for t, n, line in out if t in MODULES]


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_import_points_up_the_layers():
    bad = []
    for m, imps in GRAPH.items():
        for target, _, line in imps:
            if _layer(target) > _layer(m):
                bad.append(
                    f"{MODULES[m].relative_to(ROOT)}:{line}: {m} ({LAYERS[_layer(m)][0]}) imports "
                    f"{target} ({LAYERS[_layer(target)][0]})"
                )
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _, _ in GRAPH[v]:
            if w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, (
        "import cycles (each line: modules that import each other, directly or not):\n"
        + "\n".join(" <-> ".join(c) for c in cycles)
    )


def _private_parent(mod: str) -> str | None:
    """The package a private module belongs to (``a.b._c`` -> ``a.b``), or None for a public module."""
    parts = mod.split(".")
    for i, p in enumerate(parts):
        if p.startswith("_") and not p.startswith("__"):
            return ".".join(parts[:i])
    return None


def test_no_module_reads_another_modules_privates():
    bad = []
    for m, imps in GRAPH.items():
        for target, name, line in imps:
            where = f"{MODULES[m].relative_to(ROOT)}:{line}"
            if name is not None and name.startswith("_") and not name.startswith("__") and target != m:
                bad.append(f"{where}: {m} imports private {name!r} from {target}")
            owner = _private_parent(target)
            if owner is not None and owner != PKG and not (m == owner or m.startswith(owner + ".")):
                bad.append(f"{where}: {m} imports {target}, private to {owner}")
    assert not bad, "private names read across modules:\n" + "\n".join(bad)


def test_the_layer_table_is_in_the_design_doc():
    doc = (ROOT / "docs" / "design.md").read_text()
    for _, names in LAYERS:
        for n in names:
            if n:
                assert f"`{n}`" in doc, f"docs/design.md does not name the module `{n}` in its layer table"


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if not m.startswith(f"{PKG}.kernels")))
def test_modules_stay_small(mod):
    """No module over 500 lines unless docs/design.md §7 names it with its reason."""
    n = len(MODULES[mod].read_text().splitlines())
    if n <= 500:
        return
    rel = str(MODULES[mod].relative_to(ROOT))
    doc = (ROOT / "docs" / "design.md").read_text()
    assert rel in doc, f"{rel} has {n} lines (> 500) and docs/design.md §7 gives no reason for it"


def test_every_package_is_installed():
    """pyproject.toml lists packages explicitly (kernels/ is mapped into the package): a new subpackage that is
    missing there works from a checkout but is absent from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m in MODULES if _is_package(m)}
    assert packages <= listed, f"packages missing from pyproject.toml: {sorted(packages - listed)}"
