"""The layers of ftune hold (docs/architecture.md): no import cycle between its modules or its
packages, every import from a layer to itself or one below, kernels that import no model or
engine code, and `ftune validate` without torch.

Imports are read from the source (ast), those inside functions too: an import moved into a
function to dodge a cycle is still an arrow between two modules. Imports under `if TYPE_CHECKING:`
are annotations only and are left out."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import QUICKSTART, REPO

PACKAGE = REPO / "ftune"
TORCH_STACK = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(name: str, node: ast.AST) -> list[str]:
    """The ftune modules an import statement of module `name` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the module's package upwards
        package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    # `from ftune.kernels import lora` names the submodule where there is one, else the package
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def imports_of(name: str) -> set[str]:
    """The ftune modules that module `name` imports, anywhere in its file."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        for target in _imported(name, node):
            if target.split(".")[0] == "ftune":
                # `import ftune.engine.planner` names the module; the nearest one that exists
                while target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in MODULES and target != name:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(MODULES[name].read_text()))
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def package_of(name: str) -> str:
    """ftune.engine.checkpoint -> ftune.engine; a top-level module (ftune.recipe) is its own."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or MODULES[name].name == "__init__.py" else name


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_import_reader_finds_imports_inside_functions_and_skips_type_checking():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert "ftune.presets" in GRAPH["ftune.recipe"]  # a module-level import
    assert "ftune.engine.planner" in GRAPH["ftune.model"]
    assert "ftune.export" in GRAPH["ftune.cli.export"]  # inside the command's function
    assert not {name for name in GRAPH["ftune.presets"] if name.startswith("ftune")}  # only under TYPE_CHECKING


def package_graph() -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        packages.setdefault(package_of(name), set()).update(package_of(t) for t in targets)
    for package, targets in packages.items():
        targets.discard(package)
    return packages


def test_no_import_cycle_between_modules():
    assert cycles(GRAPH) == [], "modules that import each other, directly or around a loop"


def test_no_import_cycle_between_packages():
    assert cycles(package_graph()) == [], "packages (or top-level modules) that import each other around a loop"


# The layers of docs/architecture.md, from the bottom: a module imports from its own layer or below
LAYERS = [
    {"ftune.errors", "ftune.families", "ftune.presets", "ftune.known_models"},  # facts, torch-free
    {"ftune.recipe", "ftune.formats", "ftune.outputs"},  # the recipe's schema, its files
    {"ftune.model_config", "ftune.data", "ftune.docgen", "ftune.memory"},  # what a recipe names
    {"ftune.plan"},  # one resolution of a recipe
    {"ftune.checks", "ftune.guards"},  # the recipe against this machine and model
    {"ftune.kernels"},  # pure ops
    {"ftune.integrations"},  # every patch of transformers, peft, TRL, bitsandbytes
    {"ftune.engine"},  # activation checkpointing, host memory
    {"ftune.model", "ftune.checkpoints", "ftune.reports", "ftune.model_card"},  # a built model, a run's files
    {"ftune.inference", "ftune.measure", "ftune.workflows"},  # what uses a built model
    {"ftune.export", "ftune.runner", "ftune.compare"},  # whole jobs
    {"ftune.cli"},
    {"ftune.__main__", "ftune"},
]


def layer_of(name: str) -> int:
    unit = package_of(name)
    return next(index for index, members in enumerate(LAYERS) if unit in members)


def test_every_module_has_a_layer():
    assert [name for name in GRAPH if not any(package_of(name) in layer for layer in LAYERS)] == []


def test_imports_run_down_the_layers():
    upward = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() for target in targets
                    if layer_of(target) > layer_of(name))
    assert upward == [], "imports from a lower layer to a higher one (docs/architecture.md)"


def test_kernels_import_nothing_of_ftune_but_kernels():
    outside = {name: sorted(t for t in targets if not t.startswith("ftune.kernels"))
               for name, targets in GRAPH.items() if name.startswith("ftune.kernels")}
    assert {name: targets for name, targets in outside.items() if targets} == {}


def test_the_recipe_schema_imports_none_of_the_checks():
    assert GRAPH["ftune.recipe"] <= {"ftune.errors", "ftune.presets"}


def test_validate_imports_no_torch():
    """`ftune validate` reads the recipe, its data file and its model's config, and resolves the
    plan, without torch or the libraries built on it (they take seconds to import)."""
    script = ("import sys\nsys.argv = ['ftune', 'validate', sys.argv[1]]\nfrom ftune.cli import main\n"
              "try:\n    main()\nexcept SystemExit as finished:\n    assert not finished.code, finished.code\n"
              f"print(sorted(name for name in sys.modules if name.split('.')[0] in {TORCH_STACK!r}))")
    result = subprocess.run([sys.executable, "-c", script, str(QUICKSTART)], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "✓" in result.stderr and "kernel rms_norm" in result.stderr
    assert result.stdout.strip() == "[]", f"imported: {result.stdout.strip()[:300]}"
