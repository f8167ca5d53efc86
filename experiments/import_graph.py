"""The package's import structure: circles, function-level imports, layer violations.

    python experiments/import_graph.py [--layers]

Reads every module of `met_lightning/` with `ast` (nothing is imported). Prints the import
circles (strongly connected components; an import inside a function is an edge too, so a circle
patched with a late import still shows), every import inside a function (allowed: an optional
extra, `OPTIONAL`, or one named by a comment on its line or the line above), and with `--layers`
every import from a lower layer into a higher one (`LAYERS`, lowest first).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "met_lightning"
# lowest first: a module may import only from its own layer or lower ones. A name is a module or
# package under met_lightning/; the longest one that names a module decides (export.__main__).
LAYERS = [
    ["errors", "atomic", "paths", "structured"],  # no package imports but errors
    ["models", "losses", "macs", "spec"],  # the network, its loss, MACs, the backbone's input
    ["data"],  # datasets and batch transforms
    ["checkpoint", "builders"],  # save / load / verify / resume / migrate a run folder
    ["inference"],  # confidence, budget maths on stored logits, early-exit engine, session
    ["training", "config"],  # LightningModule, optimizer, loggers, ...; the config's checks
    ["export", "demo"],  # ONNX graphs and runner; the demo's source task
    # entry points: python -m met_lightning{,.predict,.serve,.export,.demo.pretrain}
    [
        "cli",
        "cluster",
        "train",
        "predict",
        "serve",
        "serve_metrics",
        "__main__",
        "export.__main__",
        "demo.pretrain",
    ],
]
# top-level packages of the optional extras (pyproject), which may be imported where used
OPTIONAL = {"litserve", "uvicorn", "onnx", "onnxruntime", "onnxscript", "wandb", "optuna"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST, name: str) -> tuple[set[str], list[tuple[int, set[str]]]]:
    """(modules imported at module level, (line, modules) of each import inside a function)."""
    top, inner = set(), []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        package = name.split(".")[: len(name.split(".")) - child.level + 1]
                        base = ".".join(package + ([base] if base else []))
                    targets = {base} | {f"{base}.{a.name}" for a in child.names}
                else:
                    targets = {a.name for a in child.names}
                if inside:
                    inner.append((child.lineno, targets))
                else:
                    top.update(targets)
            visit(child, inside)

    visit(tree, False)
    return top, inner


def layer(module: str) -> int | None:
    """The index in LAYERS of `module` (met_lightning.a.b), None if it is in none."""
    parts = module.split(".")[1:]
    if not parts:  # met_lightning/__init__.py: the version only
        return 0
    for size in range(len(parts), 0, -1):
        key = ".".join(parts[:size])
        for i, names in enumerate(LAYERS):
            if key in names:
                return i
    return None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", action="store_true")
    args = parser.parse_args()
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph, function_level = {}, []
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        top, inner = imports(ast.parse("\n".join(lines)), name)
        edges = top | {t for _, targets in inner for t in targets}
        graph[name] = {t for t in edges if t in modules and t != name}
        for line, targets in inner:
            extra = {t.split(".")[0] for t in targets} <= OPTIONAL
            named = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")
            module = min(targets, key=len)
            function_level.append((name, line, module, "optional extra" if extra else
                                   "named in a comment" if named else "UNEXPLAINED"))  # fmt: skip
    found = circles(graph)
    print(f"import circles (function-level imports included): {len(found)}")
    for circle in found:
        print("  " + " <-> ".join(circle))
    unexplained = sum(why == "UNEXPLAINED" for *_, why in function_level)
    print(f"function-level imports: {len(function_level)} ({unexplained} unexplained)")
    for name, line, module, why in function_level:
        print(f"  {name}:{line} -> {module}  [{why}]")
    if args.layers:
        unplaced = sorted(m for m in modules if layer(m) is None)
        upward = sorted(
            (a, b)
            for a in graph
            for b in graph[a]
            if None not in (layer(a), layer(b)) and layer(b) > layer(a)
        )
        print(f"modules in no layer: {len(unplaced)}" + "".join(f"\n  {m}" for m in unplaced))
        print(f"imports from a lower layer to a higher one: {len(upward)}")
        for a, b in upward:
            print(f"  {a} (layer {layer(a)}) -> {b} (layer {layer(b)})")


if __name__ == "__main__":
    main()
