"""The package's layout is its architecture (README, "Architecture"): wings stacked in layers,
each importing only from its own wing and the layers below, and no import cycles between
modules. Read from the source's import statements (lazy ones inside functions included), so a
new import that breaks the layering fails here, not in a reviewer's head."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stfpm"

# Each wing (a subpackage, or a top-level module) and its layer: a module may import from its
# own wing and from any wing of a lower layer, never from a wing of its own layer or above.
LAYERS = {
    0: ("errors", "metrics", "runtime", "own_cluster"),
    1: ("storage", "noise"),
    2: ("nn", "data"),
    3: ("model",),
    4: ("evaluate", "results"),
    5: ("training",),
    6: ("api", "scoring", "raytrain", "serving"),
    7: ("audit",),
    8: ("cli", "__init__"),
}
LAYER_OF = {wing: layer for layer, wings in LAYERS.items() for wing in wings}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The stfpm modules `path` imports, anywhere in the file. `from stfpm.x import y` counts as
    stfpm.x.y when that is a module, else as stfpm.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("stfpm")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("stfpm"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    # `import stfpm` (for __version__) names the package root, which every import of a
    # submodule has already run: not an edge of the layering.
    return {name: imports_of(path, modules) - {name, "stfpm"} for name, path in files.items()}


def test_every_wing_has_a_layer():
    unplaced = {wing(m) for m in import_graph()} - set(LAYER_OF)
    assert not unplaced, f"place these in LAYERS (and in the README's architecture): {sorted(unplaced)}"


def test_no_wing_imports_a_wing_of_its_layer_or_above():
    wrong = []
    for module, targets in import_graph().items():
        for target in targets:
            src, dst = wing(module), wing(target)
            if src != dst and LAYER_OF[dst] >= LAYER_OF[src]:
                wrong.append(f"{module} (layer {LAYER_OF[src]}) imports {target} (layer {LAYER_OF[dst]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_the_rules_see_a_violation(tmp_path):
    """The checks read real imports: a lower wing importing a higher one is reported."""
    modules = {"stfpm.model.card", "stfpm.training.run"}
    bad = tmp_path / "card.py"
    bad.write_text("def f():\n    from stfpm.training.run import train\n")
    assert imports_of(bad, modules) == {"stfpm.training.run"}
    assert LAYER_OF[wing("stfpm.training.run")] > LAYER_OF[wing("stfpm.model.card")]
