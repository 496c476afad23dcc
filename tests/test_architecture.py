"""The source tree's shape: no import cycles, data flowing one way (config -> model -> cache -> planner),
no module over 400 lines. Read from the source (AST), so lazy imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "kvlab"
MAX_LINES = 400

# lower layers never import higher ones, not even inside a function
LAYERS = [
    ("config", {"kvlab._version", "kvlab.errors", "kvlab.safe_io", "kvlab.typecheck", "kvlab.plugins", "kvlab.config_options",
                "kvlab.config"}),
    ("runtime", {"kvlab.rope", "kvlab.norms", "kvlab.mlp", "kvlab.linear_layout", "kvlab.registry", "kvlab.sharing", "kvlab.cache",
                 "kvlab.kernels",
                 "kvlab.hyper_connections", "kvlab.per_layer_embeddings", "kvlab.attention"}),
    ("model", {"kvlab.model"}),
]
# Model's convenience methods (``model.generate``, ``model.save``) delegate upwards on call
FACADES = {("kvlab.model", "kvlab.generate"), ("kvlab.model", "kvlab.checkpoint")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict, top_level_only: bool) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    found = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {target for target in found if target in modules and target != name}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules, top_level_only) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer(name: str) -> int | None:
    for i, (_, members) in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return i
    return len(LAYERS)  # everything else (planner, hf, checkpoint, cli, ...) is above the model


def test_no_import_cycles_at_import_time():
    assert _cycles(_graph(top_level_only=True)) == []


def test_no_import_cycles_below_the_model_even_lazily():
    graph = _graph(top_level_only=False)
    low = {name: {t for t in targets if _layer(t) <= 2} for name, targets in graph.items() if _layer(name) <= 2}
    assert _cycles(low) == []


def test_data_flows_one_way():
    """A module imports (even lazily) only modules of its own layer or below."""
    upward = sorted((name, target) for name, targets in _graph(top_level_only=False).items()
                    for target in targets if _layer(target) > _layer(name) and (name, target) not in FACADES)
    assert upward == []


def test_config_layer_imports_nothing_above_it():
    graph = _graph(top_level_only=False)
    for name in LAYERS[0][1]:
        assert graph[name] <= LAYERS[0][1], name


def test_no_source_module_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
