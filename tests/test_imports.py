"""The project's four packages import each other without a cycle, and the runtime stands alone.

Only module-level imports count: one inside a function runs when the function is called, which
is how an optional dependency (torch, triton, starlette) is kept out of a module's import. Imports
under `if TYPE_CHECKING:` never run and do not count either. The modules are read with `ast`, not
imported, so the test needs none of the optional dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Import name -> folder, as pyproject.toml's [tool.setuptools.package-dir] maps them.
PACKAGES = {
    "star_runtime": REPO / "star_runtime",
    "star_training": REPO / "training",
    "star_kernels": REPO / "kernels",
    "star_export": REPO / "export",
}


def _modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: at top level, or inside top-level `if`,
    `try`, `with` and class bodies -- never inside a function or a TYPE_CHECKING block."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []) or []:
                    if isinstance(child, ast.ExceptHandler):
                        pending.extend(child.body)
                    elif isinstance(child, ast.stmt):
                        pending.append(child)
    return found


def _resolve(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict[str, Path]
) -> set[str]:
    """The project modules one import statement loads (other than the importer's parents)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if node.level:
        base = importer.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found: set[str] = set()
    for alias in node.names:
        submodule = f"{target}.{alias.name}"
        if submodule in modules:
            found.add(submodule)  # `from pkg import module`
        elif target in modules:
            found.add(target)  # `from module import name`
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _module_level_imports(tree):
            edges |= _resolve(node, name, is_package, modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == GREY:
                return stack[stack.index(nxt) :] + [nxt]
            if colour.get(nxt) == WHITE:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for start in sorted(graph):
        if colour[start] == WHITE:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read() -> None:
    # Guards against a walker that finds no edges and so can never fail.
    graph = _graph()
    assert "star_training.checkpoint" in graph
    assert "star_kernels" in graph["star_training.model"]
    assert "star_runtime.runtime" in graph["star_runtime"]


def test_the_finder_sees_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_the_kernel_layers() -> None:
    # state <- reference <- module, and the kernel on the state alone: the module imports the
    # kernel only inside a function, where Triton may be missing.
    graph = _graph()
    assert graph["star_kernels.state"] == set()
    assert graph["star_kernels.reference"] == {"star_kernels.state"}
    assert graph["star_kernels.module"] == {"star_kernels.reference", "star_kernels.state"}
    assert graph["star_kernels.star_triton"] == {"star_kernels.state"}


def test_the_runtime_imports_no_other_project_package() -> None:
    # Anywhere, not only at module level: an edge install has star_runtime and nothing else.
    others = ("star_training", "star_kernels", "star_export")
    offenders = []
    for path in sorted(PACKAGES["star_runtime"].rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] in others:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not offenders, "\n".join(offenders)
