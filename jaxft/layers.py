"""The layer table: which module may import which. A module imports only modules of its own layer or of the
layers above it in this table (bottom first), never around a cycle; tests/test_layers.py reads every import in
jaxft/ (function bodies included) and holds the code to it. Only the CLI defers its own imports into functions
(start-up time); deferring third-party imports (torch, transformers) is fine anywhere.

A row names packages or modules by their dotted prefix; a module belongs to the row with its longest prefix
("jaxft" alone is the package root, not a prefix: a new module must be given a row).
"""

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # what leans on nothing of ours: the error type, atomic files, text metrics, the example model's download
    ("leaves", ("jaxft", "jaxft.errors", "jaxft.files", "jaxft.metrics", "jaxft.example", "jaxft.layers")),
    # the one parametric decoder, its heads and name tables, and the per-call state its layers read
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
             "jaxft.losses", "jaxft.objective", "jaxft.generate", "jaxft.train")),
    # what a run can train: one module per objective, picked from a table
    ("objectives", ("jaxft.objectives",)),
    # what a CLI verb runs
    ("commands", ("jaxft.commands",)),
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
