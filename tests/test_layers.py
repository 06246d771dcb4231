"""The layer table (jaxft/layers.py) holds: every import in jaxft/ — function bodies included — goes down the
table or stays in its layer, never around a cycle; only the CLI defers its own imports; no module borrows
another's private name; config and data parsing import no jax. Pure `ast` reading, no jaxft import but the
table itself."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

from jaxft.layers import DEFERRED_OK, LAYERS, NO_JAX, layer_of

PKG = Path(__file__).resolve().parent.parent / "jaxft"


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


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
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
                out.append(sorted(comp) + [sorted(comp)[0]])

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_go_down_the_layer_table():
    bad = violations(PKG)
    assert not bad, "\n".join(bad)


def test_the_check_fails_on_an_upward_import_inside_a_function(tmp_path):
    """The check itself can fail: a copy of the package with one upward import hidden in a function body."""
    root = tmp_path / "jaxft"
    shutil.copytree(PKG, root, ignore=shutil.ignore_patterns("__pycache__"))
    f = root / "files.py"
    f.write_text(f.read_text() + "\n\ndef _sneaky():\n    from jaxft.commands.train import train\n\n    return train\n")
    bad = violations(root)
    assert any("jaxft/files.py" in b and "a layer above it" in b for b in bad), bad
    assert any("jaxft/files.py" in b and "inside a function" in b for b in bad), bad
    assert any(b.startswith("import cycle") for b in bad), bad  # commands → ... → files → commands


def test_config_and_data_import_no_jax():
    """Parsing a config or a data file loads no accelerator stack (fast start-up, usable without jax)."""
    mods = sorted(module_name(f, PKG) for f in PKG.rglob("*.py")
                  if any(module_name(f, PKG).startswith(p) for p in NO_JAX))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods) +
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'torch', 'transformers')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"importing {', '.join(mods)} loaded {r.stdout.strip()}"
