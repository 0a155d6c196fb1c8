"""Imports between dtpf_jax modules run one way (no cycle, not even through a lazy import)."""

import ast
import graphlib
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dtpf_jax"


def module_imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """dtpf_jax modules a file imports anywhere in it (inside functions too); 'dtpf_jax' = the
    package's __init__."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "dtpf_jax":
                    found.add(parts[1] if len(parts) > 1 else "dtpf_jax")
        elif isinstance(node, ast.ImportFrom):
            base = "dtpf_jax" if node.level else node.module or ""
            if node.level and node.module:
                base = f"dtpf_jax.{node.module}"
            parts = base.split(".")
            if parts[0] != "dtpf_jax":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found |= {a.name if a.name in modules else "dtpf_jax" for a in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in PACKAGE.glob("*.py")}
    files["dtpf_jax"] = files.pop("__init__")
    return {name: module_imports(path, set(files)) - {name} for name, path in files.items()}


def test_the_module_graph_is_acyclic():
    graph = import_graph()
    assert {"data", "text", "infer", "networks"} <= set(graph)  # the parser sees the package
    assert "networks" in graph["infer"]  # ... and its imports
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        raise AssertionError(
            f"dtpf_jax modules import each other: {' -> '.join(reversed(e.args[1]))}; "
            "move what both need into a module below them"
        ) from None
    assert len(order) == len(graph)
