"""The package by layer: each layer's modules and lines, the import counts, and any breach of the table.

    python scripts/layers.py [PACKAGE_DIR]      # default: this checkout's jaxft/

Prints one row per layer of jaxft/layers.py (modules, lines of code), then the jaxft imports: all of them,
those inside functions (only the CLI may), distinct module edges, imports that run up the table, private names
taken from another module, and import cycles. tests/test_layers.py fails on any breach; this prints figures.
Reads the files with `ast` only (works on any checkout, older ones included: modules the table does not know
are listed as such).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxft.layers import LAYERS, cycles, imports, layer_of, module_name  # noqa: E402


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "jaxft").resolve()
    files = {module_name(f, root): f for f in sorted(root.rglob("*.py"))}
    rows: dict[str, list[tuple[str, int]]] = {name: [] for name, _ in LAYERS}
    rows["(no row)"] = []
    for mod, f in files.items():
        try:
            row = LAYERS[layer_of(mod)][0]
        except KeyError:
            row = "(no row)"
        rows[row].append((mod, len(f.read_text().splitlines())))
    print(f"{'layer':<12}{'modules':>8}{'lines':>8}  largest")
    for name, mods in rows.items():
        if mods:
            big = max(mods, key=lambda m: m[1])
            print(f"{name:<12}{len(mods):>8}{sum(n for _, n in mods):>8}  {big[0]} ({big[1]})")
    found = imports(root)
    own = [i for i in found if i[2] in files]
    lazy = [i for i in own if not i[3]]
    edges = {(m, t) for m, _, t, _, _ in own if t != m}
    graph = {m: {t for s, t in edges if s == m} for m in files}
    up = []
    for m, _, t, _, _ in own:
        try:
            up += [(m, t)] if layer_of(t) > layer_of(m) else []
        except KeyError:
            pass
    private = [(m, t, n[0]) for m, _, t, _, n in own if n and n[0].startswith("_") and not n[0].startswith("__")
               and t != m]
    loops = cycles(graph)
    print(f"\nimports of jaxft modules: {len(own)}; inside functions: {len(lazy)} "
          f"({sum(1 for i in lazy if not i[0].endswith('cli'))} outside cli.py); module edges: {len(edges)}")
    print(f"running up the table: {len(up)}; private names across modules: {len(private)}; "
          f"import cycles: {len(loops)} (modules caught in them: {max((len(knot(graph, c[0])) for c in loops), default=0)}"
          f"; shortest loop: {min((len(c) - 1 for c in loops), default=0)} modules)")
    flat = [f for f in files.values() if f.parent == root and f.name != "__init__.py"]
    print(f"modules directly in {root.name}/ (not in a sub-package): {len(flat)}")


def knot(graph: dict[str, set[str]], m: str) -> set[str]:
    """The modules on some import loop through m (its strongly connected component): reached from m and reaching it."""
    def reach(start, edges):
        seen, todo = {start}, [start]
        while todo:
            for w in edges.get(todo.pop(), ()):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    back = {}
    for a, ts in graph.items():
        for t in ts:
            back.setdefault(t, set()).add(a)
    return reach(m, graph) & reach(m, back)


if __name__ == "__main__":
    main()
