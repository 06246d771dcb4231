"""What a forward call tells the layers under it: `Ctx`, the per-call state of one forward pass.

The decoder passes a `Ctx` down to every `Linear`; only `jaxft.adapters` reads it. "Adapters off" (the
DPO / RL reference) is the same graph called with `OFF` — the model as loaded — and dropout keys or per-row
adapter ids arrive as arguments, never as attributes written onto modules.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ctx:
    """Per-call state of one forward pass.

    dropout_key: turns on adapter dropout (training); the layer scan folds in the layer index and each
        projection its own index (`Ctx.fold`), so every module of every layer draws its own mask.
    adapter_ids: [B] int, which adapter each row uses (mixed-adapter batches); None = the only one.
    enabled: False runs the base model (every adapter skipped): a static switch, so a second graph.
    """

    dropout_key: jax.Array | None = None
    adapter_ids: jax.Array | None = None
    enabled: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def fold(self, data) -> Ctx:
        """This context with the dropout key folded by `data` (e.g. the layer index inside the scan)."""
        if self.dropout_key is None:
            return self
        return dataclasses.replace(self, dropout_key=jax.random.fold_in(self.dropout_key, data))


ON = Ctx()  # the default: adapters on, no dropout
OFF = Ctx(enabled=False)  # the base model: every adapter switched off
