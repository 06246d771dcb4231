"""The objectives a run can train, one module each; the loop imports none of them.

    obj = make(run, setup, say=print, wrap=lambda b: b, train=True)     # OBJECTIVES[run.objective](...)

Each `make` returns a `jaxft.objective.Objective`. An objective's config section, the model head it trains
and its cross-section checks live in `jaxft.config.objectives` (below this package: parsing a config imports no
objective); OBJECTIVES here has the same names as `jaxft.config.objectives.CHECKS`.
"""

from __future__ import annotations

from jaxft.data.check import check_file
from jaxft.objectives import dpo, grpo, ppo, reward_model, sft

OBJECTIVES = {"sft": sft.make, "dpo": dpo.make, "reward": reward_model.make, "grpo": grpo.make, "rloo": grpo.make_rloo,
              "ppo": ppo.make}
ROWS = {"sft": "sft", "dpo": "pairs", "reward": "pairs", "grpo": "prompts", "rloo": "prompts", "ppo": "prompts"}


def check_data(run, training: bool = True) -> None:
    """Each data file the run reads has a usable row of the kind its objective reads (jaxft.data.check):
    called before the model loads, so wrong columns are reported in a second, not after the load."""
    d = run.data
    if run.adapters:
        files = [(f"adapters[{i}].{k}", getattr(a, k)) for i, a in enumerate(run.adapters)
                 for k in (("train", "validation") if training else ("validation",))]
    else:
        files = [("data.train", d.train if training or (d.validation is None and d.validation_fraction > 0) else None),
                 ("data.validation", d.validation)]
    for where, path in files:
        if path:
            check_file(path, ROWS[run.objective], d.format, where, lazy=d.streaming and where == "data.train")


def make(run, setup, say=lambda *a: None, wrap=lambda b: b, train: bool = True):
    """The run's objective (a jaxft.objective.Objective): the one place a run's objective name is looked up,
    so the loop and the evaluator never know one."""
    return OBJECTIVES[run.objective](run, setup, say, wrap, train)
