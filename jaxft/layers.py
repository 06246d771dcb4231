"""The layer table: which module may import which. A module imports only modules of its own layer or of the
layers above it in this table (bottom first), never around a cycle; tests/test_layers.py reads every import in
jaxft/ (function bodies included) and holds the code to it. Only the CLI defers its own imports into functions
(start-up time); deferring third-party imports (torch, transformers) is fine anywhere.

A row names packages or modules by their dotted prefix; a module belongs to the row with its longest prefix
("jaxft" alone is the package root, not a prefix: a new module must be given a row).

    python scripts/layers.py        # the table, each layer's modules and lines, import counts, any breach
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # what leans on nothing of ours: the error type, atomic files, text metrics, distribution divergences (numpy),
    # the example model's download
    ("leaves", ("jaxft", "jaxft.errors", "jaxft.files", "jaxft.metrics", "jaxft.divergence", "jaxft.example",
                "jaxft.layers")),
    # the one parametric decoder, its heads and name tables, its attention kernels (jaxft.models.attention),
    # and the per-call state its layers read
    ("models", ("jaxft.context", "jaxft.models")),
    # run configuration: plain Python, no jax, no objective
    ("config", ("jaxft.config",)),
    # host-side pieces below the model's adapters: quantized kernels, the mesh, processes, data (no jax)
    ("host", ("jaxft.quant", "jaxft.sharding", "jaxft.distributed", "jaxft.data")),
    # parameter-efficient methods under the decoder's Linear layers, and the bank of several
    ("adapters", ("jaxft.adapters",)),
    # what other programs read and write: Hugging Face checkpoints, GGUF, PEFT adapters (and their merge maths)
    ("formats", ("jaxft.formats",)),
    # a run: building it, its optimizer, step, loop, checkpoints, logs, sampling, reading it back, scoring
    ("run", ("jaxft.optim", "jaxft.setup", "jaxft.runs", "jaxft.scoring", "jaxft.checkpoint", "jaxft.runlog",
             "jaxft.losses", "jaxft.objective", "jaxft.generate", "jaxft.regression", "jaxft.train")),
    # what a run can train: one module per objective, picked from a table
    ("objectives", ("jaxft.objectives",)),
    # what a CLI verb runs, and lm-evaluation-harness's backend (jaxft.lm_eval.JaxftLM)
    ("commands", ("jaxft.commands", "jaxft.lm_eval")),
    # argparse
    ("cli", ("jaxft.cli",)),
)

DEFERRED_OK = ("jaxft.cli",)  # the modules that may import jaxft inside a function
NO_JAX = ("jaxft.config", "jaxft.data")  # packages whose import loads no jax (nor flax, torch, transformers)


def layer_of(module: str) -> int:
    """The row index of a dotted module name (its longest matching prefix); KeyError when none matches."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or (p != "jaxft" and module.startswith(p + "."))), default=None)
    if best is None:
        raise KeyError(module)
    return best[1]


# ---------------------------------------------------------------- reading the imports (tests/test_layers.py)


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(root: Path) -> list[tuple[str, int, str, bool, tuple[str, ...]]]:
    """(module, line, imported module, at module level?, names) for every import of a jaxft module."""
    mods = {module_name(f, root): f for f in root.rglob("*.py")}
    out = []
    for mod, f in sorted(mods.items()):
        tree = ast.parse(f.read_text(), str(f))
        top = {id(n) for n in tree.body}
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against the importing package
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                if not (base == "jaxft" or base.startswith("jaxft.")):
                    continue
                for a in node.names:  # `from jaxft.pkg import sub` imports the submodule sub
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                    out.append((mod, node.lineno, target, id(node) in top, (a.name,)))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "jaxft" or a.name.startswith("jaxft."):
                        out.append((mod, node.lineno, a.name, id(node) in top, ()))
    return out


def violations(root: Path) -> list[str]:
    """Every breach of the table in the package at `root`, one line each."""
    bad = []
    mods = {module_name(f, root) for f in root.rglob("*.py")}
    for m in sorted(mods):
        try:
            layer_of(m)
        except KeyError:
            bad.append(f"{m}: in no row of jaxft/layers.py LAYERS (give it one)")
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, line, target, at_top, names in imports(root):
        where = f"{mod.replace('.', '/')}.py:{line}"
        if target in mods and target != mod:
            graph[mod].add(target)
        if target not in mods or mod not in mods:
            continue
        try:
            up = layer_of(target) > layer_of(mod)
        except KeyError:
            continue
        if up:
            bad.append(f"{where}: {mod} ({LAYERS[layer_of(mod)][0]}) imports {target} "
                       f"({LAYERS[layer_of(target)][0]}), a layer above it")
        if not at_top and mod not in DEFERRED_OK:
            bad.append(f"{where}: {mod} imports {target} inside a function (only {', '.join(DEFERRED_OK)} may)")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and target != mod:
            bad.append(f"{where}: {mod} imports {target}'s private name {private[0]} (make it public or move it)")
    bad += [f"import cycle: {' → '.join(c)}" for c in cycles(graph)]
    return bad


def _loop_in(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest import loop through comp[0] inside the component: [a, b, ..., a]."""
    inside, start = set(comp), comp[0]
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & inside):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return comp + [start]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import loop per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(_loop_in(sorted(comp), graph))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out
