"""Run configuration: frozen dataclasses, YAML files, `key=value` overrides, validation up front.

    run = load_config("configs/sft_lora.yaml", ["train.steps=10", "lora.r=8"])

The whole config is checked before any model is loaded: an unknown key, a wrong type or an impossible
value is a one-line JaxftError naming the key (and the file). Architecture never appears here: it comes
from the checkpoint. The package imports no jax and no objective:

    sections.py    the general sections (model, lora, quant, data, optim, train, eval, mesh, adapters)
    objectives.py  each objective's section, the head it trains and its cross-section checks
    run.py         RunConfig, all sections together
    checks.py      validate / check_files
    load.py        YAML + overrides → RunConfig
"""

from jaxft.config.checks import VLLM_RANKS, check_files, rank_bucket, validate
from jaxft.config.load import load_config, read_config
from jaxft.config.objectives import (CaiConfig, DpoConfig, GrpoConfig, PpoConfig, RewardConfig, RlooConfig,
                                     RolloutConfig)
from jaxft.config.run import RunConfig
from jaxft.config.sections import (AdapterSpec, DataConfig, EvalConfig, LoraConfig, MeshConfig, ModelConfig,
                                   OptimConfig, QuantConfig, TrainConfig, residual_init)

__all__ = ["AdapterSpec", "CaiConfig", "DataConfig", "DpoConfig", "EvalConfig", "GrpoConfig", "LoraConfig",
           "MeshConfig", "ModelConfig", "OptimConfig", "PpoConfig", "QuantConfig", "RewardConfig", "RlooConfig",
           "RolloutConfig", "RunConfig", "TrainConfig", "VLLM_RANKS", "check_files", "load_config", "rank_bucket",
           "read_config", "residual_init", "validate"]
