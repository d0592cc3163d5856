"""The package's shape: no import circles between ccar's modules (imports inside functions and under TYPE_CHECKING
count), and no function over 80 lines. Run by hand: ``python tests/test_structure.py``."""

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 80


def _modules():
    mods = {}
    for f in (SRC / "ccar").rglob("*.py"):
        rel = f.relative_to(SRC).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return mods


def import_graph():
    """module -> the ccar modules it imports (a package's own ``__init__`` is not a dependency of its modules)."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        base = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                parts = base.split(".")
                root = ".".join(parts[: len(parts) - (node.level - 1)]) if node.level else ""
                full = ".".join(p for p in (root, node.module or "") if p)
                targets = [full] + [f"{full}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def circles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_functions():
    out = []
    for f in (SRC / "ccar").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    out.append(f"{f.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_import_circles_between_ccar_modules():
    assert circles(import_graph()) == []


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_80_lines():
    assert long_functions() == []


if __name__ == "__main__":
    found, long = circles(import_graph()), long_functions()
    for c in found:
        print("circle:", " <-> ".join(c))
    for f in long:
        print("long function:", f)
    print(f"circles {len(found)}; functions over {MAX_LINES} lines: {len(long)}")
    sys.exit(1 if found or long else 0)
