"""The arrows between mindlora's packages point one way, and no module imports itself back.

Every ``import`` in mindlora/ and tools/ is read with ``ast`` -- module-level and function-level
alike, because a lazy import hides a cycle without removing it. Two rules:

1. Layers (``RANK``): a package may import a package on a lower layer, never one on its own layer
   or above. config, then runtime and parallel (the layout leaf) at the bottom; lora, models
   above; checkpoint, data beside each other; generation, then training on top (training
   samples answers with the generation engine during a run; generation loads weights through
   ``checkpoint.loading``, never through training); the entry modules
   (``mindlora.train``/``generate``) and tools/ thin, over everything. Nothing in mindlora
   imports tools/.
2. No cycle between modules.

What still breaks a rule would be listed in ``KNOWN_UPWARD`` / ``KNOWN_CYCLES`` with the reason
(both are empty now); each entry must still be needed (a fixed one fails the test until it is
removed), so the lists only shrink.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RANK = {"config": 0, "runtime": 1, "parallel": 1, "lora": 2, "models": 3, "checkpoint": 4,
        "data": 4, "generation": 5, "training": 6, "entry": 7, "tools": 8}

# (importer package, imported package) -> why the arrow still points the wrong way.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
# Modules in a cycle -> why it is still there.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def _modules() -> dict[str, str]:
    """Dotted name -> file, for mindlora/ and tools/."""
    found = {}
    for top in ("mindlora", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = os.path.join(dirpath, name)
    return found


def _imports(name: str, path: str, known: set[str]) -> set[str]:
    """The mindlora/tools modules ``name`` imports (``from p import sub`` counts as ``p.sub``)."""
    is_pkg = path.endswith("__init__.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in known else base)
    return {t for t in targets if t in known and t != name}


def package(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "tools":
        return "tools"
    if len(parts) == 1:
        return "root"
    if parts[1] in ("train", "generate"):
        return "entry"
    return parts[1]


def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def upward(edges: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    bad: dict[tuple[str, str], list[str]] = {}
    for src, targets in edges.items():
        for dst in targets:
            a, b = package(src), package(dst)
            if a == b or b == "root":
                continue
            if a == "root" or RANK[b] >= RANK[a]:
                bad.setdefault((a, b), []).append(f"{src} -> {dst}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_real() -> None:
    edges = graph()
    assert len(edges) > 60 and "mindlora.training.loop" in edges
    assert "mindlora.runtime" in edges["mindlora.training.loop"]  # function-level ones too


def test_no_import_points_up() -> None:
    bad = upward(graph())
    unexplained = {k: v for k, v in bad.items() if k not in KNOWN_UPWARD}
    assert not unexplained, "\n".join(e for v in unexplained.values() for e in v)
    stale = set(KNOWN_UPWARD) - set(bad)
    assert not stale, f"fixed, remove from KNOWN_UPWARD: {stale}"


def test_no_import_cycle() -> None:
    found = cycles(graph())
    unexplained = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not unexplained, unexplained
    stale = set(KNOWN_CYCLES) - set(found)
    assert not stale, f"fixed, remove from KNOWN_CYCLES: {stale}"


def test_the_rules_catch_what_they_name() -> None:
    edges = {"mindlora.config": {"mindlora.training.loop"}, "mindlora.training.loop": set(),
             "mindlora.data.a": {"mindlora.checkpoint.b"}, "mindlora.checkpoint.b": set(),
             "mindlora.lora.x": {"mindlora.lora.y"}, "mindlora.lora.y": {"mindlora.lora.x"}}
    assert upward(edges) == {("config", "training"): ["mindlora.config -> mindlora.training.loop"],
                             ("data", "checkpoint"): ["mindlora.data.a -> mindlora.checkpoint.b"]}
    assert cycles(edges) == [frozenset({"mindlora.lora.x", "mindlora.lora.y"})]
    assert package("mindlora.train") == "entry" and package("tools.convert_ckpt") == "tools"


def test_function_level_imports_count(tmp_path) -> None:
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from mindlora.runtime import compat\n    import mindlora.config\n")
    known = {"mindlora.runtime", "mindlora.runtime.compat", "mindlora.config", "mindlora.lora.m"}
    assert _imports("mindlora.lora.m", str(path), known) == {"mindlora.runtime.compat",
                                                            "mindlora.config"}
