"""The fastresnet package's import graph has no cycle.

A cycle forces imports inside functions, makes the import order matter and hides which layer depends on
which. Every import statement counts, those inside functions too; a module's implicit import of its own
package does not.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules() -> dict[str, Path]:
    """Every module of the installed layout: fastresnet/ and kernels/ (installed as fastresnet.kernels)."""
    found = {}
    for top, prefix in ((ROOT / "fastresnet", "fastresnet"), (ROOT / "kernels", "fastresnet.kernels")):
        for path in top.rglob("*.py"):
            if "kernels" in path.relative_to(top).parts[:1] and prefix == "fastresnet":
                continue  # the worktree's symlink to kernels/
            parts = path.relative_to(top).with_suffix("").parts
            name = ".".join((prefix, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imported(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules that `path` (module `name`) imports, each resolved to the module it loads."""

    def resolve(dotted: str) -> str:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {resolve(alias.name) for alias in node.names if alias.name.startswith("fastresnet")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("fastresnet"):
                out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else resolve(base) for a in node.names}
    return out - {name, ""}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_import_graph_has_no_cycle():
    known = modules()
    assert "fastresnet.ops.tuning" in known and "fastresnet.kernels.bn_act" in known
    graph = {name: imported(path, name, known) for name, path in known.items()}
    assert "fastresnet.ops.tuning" in graph["fastresnet.nn.blocks"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
