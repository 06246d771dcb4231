"""The objectives a run can train, one module each; the loop imports none of them.

    obj = OBJECTIVES[run.objective](run, setup, say=print, wrap=lambda b: b, train=True)

Each `make` returns a `jaxft.objective.Objective`; each module's `checks(run)` lists its
cross-section validation as (ok, key, message) rows, run by `jaxft.config.validate`. HEADS names the
model head an objective trains when it is not the LM head (jaxft.setup.build builds it).
"""

from __future__ import annotations

from jaxft.objectives import dpo, grpo, ppo, reward_model, sft

OBJECTIVES = {"sft": sft.make, "dpo": dpo.make, "reward": reward_model.make, "grpo": grpo.make, "rloo": grpo.make_rloo,
              "ppo": ppo.make}
CHECKS = {"sft": sft.checks, "dpo": dpo.checks, "reward": reward_model.checks, "grpo": grpo.checks, "rloo": grpo.checks,
          "ppo": ppo.checks}
HEADS = {"reward": "score", "ppo": "value"}  # heads.ScoreModel, heads.PolicyWithValue; the others: the Decoder
