"""RunConfig: every section of a run, general (sections.py) and per objective (objectives.py)."""

from __future__ import annotations

import dataclasses

from jaxft.config.objectives import (CaiConfig, DpoConfig, GrpoConfig, PpoConfig, RewardConfig, RlooConfig,
                                     RolloutConfig)
from jaxft.config.sections import (AdapterSpec, DataConfig, EvalConfig, LoraConfig, MeshConfig, ModelConfig,
                                   OptimConfig, QuantConfig, TrainConfig)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    objective: str = "sft"  # a key of jaxft.config.objectives.CHECKS (and of jaxft.objectives.OBJECTIVES)
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    dpo: DpoConfig = DpoConfig()
    reward: RewardConfig = RewardConfig()
    rollout: RolloutConfig = RolloutConfig()
    grpo: GrpoConfig = GrpoConfig()
    rloo: RlooConfig = RlooConfig()
    ppo: PpoConfig = PpoConfig()
    cai: CaiConfig = CaiConfig()
    mesh: MeshConfig = MeshConfig()
    adapters: tuple[AdapterSpec, ...] = ()  # several adapters trained at once (jaxft.adapters.bank)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
