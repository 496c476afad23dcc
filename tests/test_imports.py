"""No import cycles: every kvlab module imports alone (a fresh interpreter state per module), and the
graph of kvlab-to-kvlab imports, deferred ones inside functions included, has no cycle (edges into the
root package ``kvlab``, whose ``__getattr__`` re-exports the public names lazily, are not counted)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names() -> list[str]:
    names = []
    for path in sorted((SRC / "kvlab").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imports_of(name: str) -> set[str]:
    """kvlab modules ``name`` imports anywhere in its code (``from kvlab.a import b`` counts ``kvlab.a.b``
    when that is a module, else ``kvlab.a``)."""
    path = SRC / Path(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    known, out = set(module_names()), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            subs = {f"{node.module}.{alias.name}" for alias in node.names} & known
            out |= subs or {node.module}
    return out - {name, "kvlab"}  # the root package is the lazy facade every kvlab.x import runs first


def test_import_graph_has_no_cycle():
    graph = {name: imports_of(name) for name in module_names()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_every_module_imports_alone():
    """One interpreter; before each module every ``kvlab`` module is dropped from ``sys.modules``, so each
    import starts from nothing kvlab-side (third-party modules stay loaded: that keeps it fast)."""
    script = (
        "import importlib, sys\n"
        f"names = {module_names()!r}\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'kvlab' or m.startswith('kvlab.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        print(f'{name}: {type(exc).__name__}: {exc}')\n"
        "        sys.exit(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
