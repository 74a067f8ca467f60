"""The package's layout tells its architecture, and imports go one way (STYLE.md §1):

    bn_triton (the public API) -> nn/ (layers), switch -> functional -> ops/ (plan, tuning,
    launch, the torch.library ops) -> dispatch, kernels

Read from the source with ast, every import, module level or inside a function: no module of
bn_triton imports one above it, and the import graph has no cycle."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bn_triton"
# A module's layer: it may import its own layer's modules and those of lower layers only.
LAYERS = {
    "bn_triton": 5, "bn_triton.__main__": 5, "bn_triton.check": 5,
    "bn_triton.nn": 4, "bn_triton.switch": 4,
    "bn_triton.functional": 3,
    "bn_triton.ops": 2,
    "bn_triton.dispatch": 1, "bn_triton.reference": 1, "bn_triton.kernels": 0,
}


def layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise KeyError(module)


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if "experiments" in parts:  # programs on top of the public API, not the package
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imported(name: str, path: Path):
    """bn_triton modules that `name` imports (a from-import of a submodule counts as the
    submodule; `from bn_triton import __version__`, the version string, counts as none)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bn_triton"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("bn_triton"):
                continue
            known = {m for m, _ in modules()}
            for alias in node.names:
                if alias.name == "__version__":  # the package's version string, not a module
                    continue
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known or sub == "bn_triton.kernels" else target)
    return found - {name}


GRAPH = {name: imported(name, path) for name, path in modules()}


def test_the_package_is_grouped_by_idea():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "check.py", "dispatch.py", "functional.py",
                    "reference.py", "switch.py"], flat
    assert (PACKAGE / "ops" / "launch.py").exists() and (PACKAGE / "nn" / "modules.py").exists()


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_go_one_way(name):
    upward = sorted(m for m in GRAPH[name] if layer(m) > layer(name))
    assert not upward, f"{name} imports {upward}, above it"


def test_no_import_cycles():
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join(trail + [name])
        state[name] = "open"
        for dependency in sorted(GRAPH.get(name, ())):
            if dependency in GRAPH and dependency != "bn_triton":
                visit(dependency, trail + [name])
        state[name] = "done"

    for name in sorted(GRAPH):
        visit(name, [])
