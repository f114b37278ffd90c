"""The house's one direction of flow: no import circles in the package, imports inside functions
included, and the rooms that must not know each other do not."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pgm"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, at the top or inside functions. `from X import
    name` counts as importing X, or X.name when that is a module of its own."""
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets |= {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
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

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circles():
    assert circles(import_graph(PACKAGE)) == []


def test_the_checker_finds_a_circle_made_of_a_lazy_import(tmp_path):
    root = tmp_path / "house"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("from .a import f\n")
    (root / "sub" / "a.py").write_text("from ..b import g\n\ndef f():\n    return g()\n")
    (root / "b.py").write_text("def g():\n    from .sub import a\n    return a\n")
    assert circles(import_graph(root)) == [["house.b", "house.sub", "house.sub.a"]]


NEVER = [
    ("pgm.models", ("pgm.hub", "pgm.runs", "pgm.data", "pgm.objectives", "pgm.sampling", "pgm.train", "pgm.eval")),
    ("pgm.data", ("pgm.models", "pgm.hub", "pgm.runs", "pgm.vq_tokenizer", "pgm.sampling", "pgm.train")),
    ("pgm.objectives", ("pgm.models", "pgm.sampling", "pgm.train", "pgm.data")),
    ("pgm.sampling", ("pgm.train", "pgm.data", "pgm.hub", "pgm.pipeline")),
    ("pgm.errors", ("pgm",)),  # beneath everything: every room raises its kinds
    ("pgm.formats", ("pgm",)),
    ("pgm.pipeline", ("pgm.serve", "pgm.cli")),  # one way in for every front end, knowing none of them
    ("pgm.serve", ("pgm.cli", "pgm.train", "pgm.report")),
]


@pytest.mark.parametrize("room,forbidden", NEVER, ids=[room for room, _ in NEVER])
def test_rooms_that_must_not_know_each_other_do_not(room, forbidden):
    graph = import_graph(PACKAGE)
    for module, targets in graph.items():
        if module == room or module.startswith(room + "."):
            wrong = [t for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden)
                     and not (t == room or t.startswith(room + ".")) and t != "pgm.errors"]
            assert not wrong, f"{module} imports {wrong}"
