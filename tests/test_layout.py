"""
The project's layout: one reading order for the top-level files, stated in the README, and
imports that follow it. A file imports only files above it (imports inside functions count
too), so the import graph has no cycle and a reader never meets a name from further down.
"""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["model", "reward", "data", "sample", "eval", "sft", "grpo"]


def imports_of(source, names):
    """The modules among `names` that `source` imports, anywhere in the file -> {name: line}."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            mods = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module.split(".")[0]]
        else:
            continue
        for m in mods:
            if m in names:
                found.setdefault(m, node.lineno)
    return found


def against_order(sources, order):
    """(importer, imported, line) for every import of a file at or below the importer."""
    bad = []
    for name, src in sources.items():
        for m, line in imports_of(src, set(order)).items():
            if order.index(m) >= order.index(name):
                bad.append((name, m, line))
    return bad


def find_cycle(sources):
    """A list of modules that import each other in a ring, or None."""
    graph = {n: set(imports_of(s, set(sources))) - {n} for n, s in sources.items()}
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m, path + [m])
                if found:
                    return found
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return None


def read_sources():
    out = {}
    for name in ORDER:
        with open(os.path.join(ROOT, name + ".py")) as f:
            out[name] = f.read()
    return out


def test_top_level_holds_only_the_designed_files():
    code = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    assert code == sorted(n + ".py" for n in ORDER)


def test_readme_states_this_reading_order():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("## Reading order"):]
    stated = re.findall(r"^\| `(\w+)\.py` \|", table, flags=re.M)
    assert stated == ORDER


def test_imports_follow_the_reading_order():
    sources = read_sources()
    assert against_order(sources, ORDER) == []
    assert find_cycle(sources) is None


def test_the_check_catches_a_cycle_and_an_upward_import():
    """The checks above can fail: a lazy import of grpo inside model.py (a cycle through
    model <- grpo) is reported by both."""
    sources = read_sources()
    sources["model"] += "\n\ndef f():\n    import grpo  # noqa\n"
    assert ("model", "grpo", len(sources["model"].splitlines())) in against_order(sources, ORDER)
    cycle = find_cycle(sources)
    assert cycle is not None and cycle[0] == cycle[-1] and {"model", "grpo"} <= set(cycle)
    # an import downward in the order is fine, upward is not, even with no cycle
    assert against_order({"data": "import model\n", "model": ""}, ["model", "data"]) == []
    assert against_order({"data": "", "model": "from data import x\n"}, ["model", "data"]) == [("model", "data", 1)]
