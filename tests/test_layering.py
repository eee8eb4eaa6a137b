"""The package's layering (STYLE.md, "Patching models"), read from the source with ``ast``, never by importing it.

Every ``import`` / ``from ... import`` statement in ``ditkern/`` counts as an edge, wherever it stands: at module
level, inside a function, a method or a ``try``. Only imports under ``if TYPE_CHECKING:`` are left out (they never
run). An import of a package is an edge to its ``__init__``; ``from pkg import name`` is an edge to the submodule
``pkg.name`` where that file exists, else to ``pkg`` itself. The implicit import of a module's parent packages is not
an edge (Python runs them first, whoever imports; counting them would make every package a circle with its own
modules). The family registry (``ditkern/patch/families/__init__.py``) imports its families by the names in its
``MODULES`` tuple, so that a new family is one line there: those names are read as edges too.

Rules:

* kernels (``ditkern.kernels.*``) import nothing from ops, the features (cache, quant, attention, moe), patch or nn;
* ops (``ditkern.ops.*``) import no feature, no patch module and nothing of nn;
* features import no model family (they read the declarations through the registry the engine is handed);
* the patch engine imports no family module;
* there is no import circle among ditkern's modules.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "ditkern"
FEATURES = ("ditkern.cache", "ditkern.quant", "ditkern.attention", "ditkern.moe")
FAMILIES = "ditkern.patch.families"
ENGINE = "ditkern.patch.engine"
# compiled extension modules: not Python source, they import nothing of ditkern
EXTENSIONS = {"ditkern._C"}
# modules that import the modules named in one of their tuples of strings (importlib): {module: tuple name}
REGISTRIES = {FAMILIES: "MODULES"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    for sub in ast.walk(child):
                        if hasattr(sub, "lineno"):
                            lines.add(sub.lineno)
    return lines


def _resolve(name: str) -> str | None:
    """The ditkern module an imported dotted name lands on (its longest prefix that is a module of the tree)."""
    if name in EXTENSIONS:
        return None
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def _edges(module: str, path: pathlib.Path) -> list[tuple[str, int]]:
    """[(imported ditkern module, line)] of one module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    target = _resolve(alias.name)
                    if target is not None:
                        out.append((target, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = module.split(".") if _is_package(module) else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if not (src == PACKAGE or src.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                full = f"{src}.{alias.name}"
                if full in EXTENSIONS:
                    continue
                target = full if full in MODULES else _resolve(src)
                if target is not None:
                    out.append((target, node.lineno))
    if module in REGISTRIES:
        out += _registry_edges(module, tree)
    return sorted({(t, line) for t, line in out if t != module}, key=lambda e: (e[1], e[0]))


def _registry_edges(module: str, tree: ast.AST) -> list[tuple[str, int]]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == REGISTRIES[module] for t in node.targets):
            names = ast.literal_eval(node.value)
            targets = [f"{module}.{name}" for name in names]
            missing = [t for t in targets if t not in MODULES]
            assert not missing, f"{MODULES[module].relative_to(ROOT)} lists modules that do not exist: {missing}"
            return [(t, node.lineno) for t in targets]
    raise AssertionError(f"{MODULES[module].relative_to(ROOT)} has no {REGISTRIES[module]} tuple")


GRAPH: dict[str, list[tuple[str, int]]] = {m: _edges(m, p) for m, p in MODULES.items()}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(sources, forbidden) -> list[str]:
    bad = []
    for mod, edges in GRAPH.items():
        if not any(_under(mod, s) for s in sources):
            continue
        for target, line in edges:
            if any(_under(target, f) for f in forbidden):
                bad.append(f"{MODULES[mod].relative_to(ROOT)}:{line} imports {target}")
    return bad


def test_the_graph_sees_the_package():
    assert "ditkern.patch.engine" in GRAPH and "ditkern.kernels.adaln_modulate" in GRAPH
    assert any(t == "ditkern.ops.adaln_modulate" for t, _ in GRAPH["ditkern.patch.common"])
    # function-level imports count: the ops import their kernels inside the backend functions
    assert any(t == "ditkern.kernels.adaln_modulate" for t, _ in GRAPH["ditkern.ops.adaln_modulate"])


def test_kernels_import_no_ops_features_patch_or_nn():
    bad = _violations(["ditkern.kernels"], ["ditkern.ops", *FEATURES, "ditkern.patch", "ditkern.nn"])
    assert not bad, "kernels import upward:\n" + "\n".join(bad)


def test_ops_import_no_feature_patch_or_nn():
    bad = _violations(["ditkern.ops"], [*FEATURES, "ditkern.patch", "ditkern.nn"])
    assert not bad, "ops import upward:\n" + "\n".join(bad)


def test_features_import_no_family():
    bad = _violations(FEATURES, [FAMILIES])
    assert not bad, "features must read family declarations, not import them:\n" + "\n".join(bad)


def test_engine_imports_no_family():
    bad = _violations([ENGINE], [FAMILIES])
    assert not bad, "the patch engine imports a family:\n" + "\n".join(bad)


def _cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as one circle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]
    succ = {m: sorted({t for t, _ in e}) for m, e in GRAPH.items()}

    def strong(v):  # iterative, so a deep graph cannot hit the recursion limit
        work = [(v, iter(succ[v]))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(succ[w])))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            strong(v)
    return [_circle(c, succ) for c in comps]


def _circle(comp: list[str], succ) -> list[str]:
    """One shortest circle inside a strongly connected component, starting at its first module."""
    members = set(comp)
    start = comp[0]
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in succ[v]:
            if w not in members:
                continue
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def _describe(circle: list[str]) -> str:
    """The circle, each step with its file and line, then every other import inside the same strongly connected set
    (each of them lies on a circle too: all must go for the set to fall apart)."""
    steps = []
    for a, b in zip(circle, circle[1:]):
        line = next(line for t, line in GRAPH[a] if t == b)
        steps.append(f"  {MODULES[a].relative_to(ROOT)}:{line} imports {b}")
    on_circle = set(zip(circle, circle[1:]))
    comp = _component(circle[0])
    others = [
        f"  also {MODULES[a].relative_to(ROOT)}:{line} imports {t}"
        for a in sorted(comp)
        for t, line in GRAPH[a]
        if t in comp and (a, t) not in on_circle
    ]
    return " -> ".join(circle) + "\n" + "\n".join(steps + others)


def _component(start: str) -> set[str]:
    """The modules that reach ``start`` and are reached from it."""
    def reach(v, succ):
        seen, todo = {v}, [v]
        while todo:
            for w in succ(todo.pop()):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    fwd = reach(start, lambda v: [t for t, _ in GRAPH.get(v, ())])
    back = reach(start, lambda v: [m for m, e in GRAPH.items() if any(t == v for t, _ in e)])
    return fwd & back


def test_no_import_cycles():
    circles = _cycles()
    assert not circles, "import circles:\n" + "\n".join(_describe(c) for c in circles)


@pytest.mark.parametrize(
    "graph,expected",
    [({"a": ["b"], "b": ["a"]}, [["a", "b", "a"]]), ({"a": ["b"], "b": ["c"], "c": []}, [])],
)
def test_cycle_finder_finds_circles(graph, expected, monkeypatch):
    monkeypatch.setattr(
        __import__(__name__, fromlist=["GRAPH"]), "GRAPH", {k: [(t, 1) for t in v] for k, v in graph.items()}
    )
    assert _cycles() == expected
