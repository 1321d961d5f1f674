"""The library's import graph, built from the source's own import lines (function-level ones too):
no loops, no import from a higher layer, no private name used across modules.

The layers follow ../shared/DESIGN.md's map, lowest first; a module may import its own top-level
unit (a module or a package) and anything in its layer or below.  A new module must be given a
layer here, which is the point: where it sits is decided once, on purpose.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "TransferSegLib"

LAYERS = [
    {"__init__", "volume", "labels", "progress", "devices", "terminology", "lesion_table"},  # foundations
    {"atomic", "headers", "dicom_file", "io", "resample", "weights", "preprocessing", "heatmaps",  # files, arrays, checks
     "metrics", "losses", "fusion", "scope", "cards", "render", "report", "dicom_out", "calcifications", "masses",
     "provenance"},
    {"nets", "phantoms", "datasets", "inference", "views"},                             # networks and data
    {"methods"},                                                                        # how a model runs
    {"models"},                                                                         # model cards → networks
    {"pipeline", "conversion", "training"},                                             # whole jobs
    {"batch", "demo", "evaluation"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph() -> tuple[dict, dict, list]:
    """module → {imported library modules}, (module, imported) → line, and private names used across modules."""
    modules = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    graph, lines, private = {}, {}, []
    for name, path in modules.items():
        package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                if isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name in modules)
                continue
            if node.level:
                base = name.split(".") if package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("TransferSegLib"):
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                dep = full if full in modules else target
                if dep != full and alias.name.startswith("_") and not alias.name.startswith("__"):
                    private.append(f"{name} imports {alias.name} from {target} (line {node.lineno})")
                deps.add(dep)
                lines.setdefault((name, dep), node.lineno)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph, lines, private


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(unit: str) -> int:
    return next(n for n, layer in enumerate(LAYERS) if unit in layer)


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def built():
    return _graph()


def test_the_graph_sees_the_library(built):
    graph, _, _ = built
    assert "TransferSegLib.pipeline" in graph and "TransferSegLib.models" in graph["TransferSegLib.pipeline"]
    assert "TransferSegLib.nets.registry" in graph["TransferSegLib.nets.unet"]


def test_every_module_has_a_layer(built):
    graph, _, _ = built
    missing = sorted({_unit(m) for m in graph} - set().union(*LAYERS))
    assert not missing, f"give these a layer in LAYERS: {missing}"


def test_no_import_loops(built):
    graph, lines, _ = built
    cycles = _cycles(graph)
    detail = ["; ".join(f"{a} → {b} (line {lines[(a, b)]})" for a in c for b in graph[a] if b in c) for c in cycles]
    assert not cycles, "\n".join(detail)


def test_no_upward_imports(built):
    graph, lines, _ = built
    upward = [f"{a} (layer {_layer(_unit(a))}) imports {b} (layer {_layer(_unit(b))}), line {lines[(a, b)]}"
              for a, deps in sorted(graph.items()) for b in sorted(deps)
              if _unit(a) != _unit(b) and _layer(_unit(b)) > _layer(_unit(a))]
    assert not upward, "\n".join(upward)


def test_no_private_names_across_modules(built):
    _, _, private = built
    assert not private, "\n".join(private)


def test_the_checks_catch_a_loop_and_an_upward_import():
    """The checks themselves: a made-up graph with a loop and a layer-breaking edge is caught."""
    graph = {"TransferSegLib.volume": {"TransferSegLib.models"}, "TransferSegLib.models": {"TransferSegLib.volume"}}
    assert _cycles(graph) == [["TransferSegLib.models", "TransferSegLib.volume"]]
    assert _layer(_unit("TransferSegLib.models")) > _layer(_unit("TransferSegLib.volume"))


def _unexplained_imports(source: str, name: str) -> list:
    """Imports inside functions with no comment saying why: on the import's line, or on the comment line
    directly above it or above the block of imports it belongs to."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if not isinstance(inner, (ast.Import, ast.ImportFrom)):
                continue
            row = inner.lineno - 1
            explained = "#" in lines[row]
            while not explained and row > 0 and lines[row - 1].strip().startswith(("import ", "from ", "#")):
                row -= 1
                explained = "#" in lines[row]
            if not explained:
                found.append(f"{name}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    return found


def test_imports_inside_functions_say_why():
    """Imports sit at the top of the module; one inside a function says why (an optional dependency,
    torch kept out of `transferseg --help`, code the Slicer module imports before torch is installed)."""
    found = [hit for path in sorted(LIBRARY.rglob("*.py"))
             for hit in _unexplained_imports(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not found, "move these to the top of their module, or say why beside them:\n" + "\n".join(found)


def test_the_import_check_catches_an_unexplained_import():
    source = "def f():\n    import os\n    return os\n\n\ndef g():\n    # optional: only some runs\n    import json\n"
    assert _unexplained_imports(source, "m") == ["m:2: import os"]



def _top_level_names(path: Path) -> set:
    """What ``from <path's module> import X`` can take: top-level functions, classes, assignments and imports."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_bench_script_parses_and_imports_only_what_exists():
    """The benchmarks are run by hand, never by CI, so a script that no longer parses (or imports a
    bench module's name or a library module that is gone) would go unseen until a user runs it."""
    bench = ROOT / "bench"
    local = {p.stem for p in bench.glob("*.py")}
    for path in sorted(bench.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))  # a SyntaxError names the line
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                continue
            top = node.module.split(".")[0]
            if top == "TransferSegLib":
                target = ROOT / Path(*node.module.split("."))
                assert target.with_suffix(".py").is_file() or (target / "__init__.py").is_file(), (path.name, node.module)
            elif top in local:
                missing = [a.name for a in node.names if a.name not in _top_level_names(bench / f"{top}.py")]
                assert not missing, (path.name, top, missing)
