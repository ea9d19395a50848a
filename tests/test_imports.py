"""The package's import graph, read from the source with ``ast``: no circle, function-local imports included (a local
import hides a circle from Python, not from this test), and the bundles module imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "monai_du"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``path`` imports anywhere in its body (``from monai_du import x`` counts as
    ``monai_du.x`` when ``x`` is a module, else as ``monai_du``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import monai_du.data.cache` imports that module
                name = name.rpartition(".")[0]
            if name.startswith("monai_du"):
                found.add(name)
    if path.is_relative_to(PACKAGE):
        found.discard(_module_name(path))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    # a package's __init__ that re-exports its submodules is not an edge back into them: importing
    # `monai_du.data.manifest` runs `monai_du.data/__init__` first, so only edges between modules count
    return {name: {dep for dep in deps if not name.startswith(dep + ".")} for name, deps in graph.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + "."):
                continue  # a package importing its own submodules
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if state.get(dep) is None:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walker_finds_a_planted_circle():
    graph = {"monai_du.a": {"monai_du.b"}, "monai_du.b": {"monai_du.c"}, "monai_du.c": {"monai_du.a"}}
    assert _find_cycle(graph) == ["monai_du.a", "monai_du.b", "monai_du.c", "monai_du.a"]
    assert _find_cycle({"monai_du.a": {"monai_du.b"}, "monai_du.b": set()}) is None


def test_the_walker_reads_local_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from monai_du.compare import run_compare\n    import monai_du.io\n")
    modules = {"monai_du.compare": source, "monai_du.io": source, "monai_du": source}
    assert _imports(source, modules) == {"monai_du.compare", "monai_du.io"}


def test_the_package_has_no_import_circle():
    graph = _graph()
    assert "monai_du.compare" in graph and graph["monai_du.compare"], "the walker read no import"
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_bundles_is_the_bottom_of_compare_audit_and_bundle_priors():
    graph = _graph()
    assert not {dep for dep in graph["monai_du.bundles"] if dep != "monai_du"}, graph["monai_du.bundles"]
    for user in ("monai_du.compare", "monai_du.bundle_priors", "monai_du.audit.candidates"):
        assert "monai_du.bundles" in graph[user], user
    assert "monai_du.compare" not in set().union(*(graph[m] for m in graph if m.startswith("monai_du.audit")))
