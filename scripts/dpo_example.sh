#!/usr/bin/env bash
# DPO example on the embedded default: LoRA DPO of SmolLM2-135M-Instruct on preference pairs built from the
# quickstart task (chosen = the correct JSON, rejected = one typical mistake), then base vs tuned:
# held-out reward accuracy (validation pairs) and the generation metric (test rows).
# Extra arguments are config overrides, e.g. `bash scripts/dpo_example.sh dpo.loss_type=ipo`.
. "$(dirname "$0")/_venv.sh"
set -x
jaxft task-data runs/dpo/data --pairs
jaxft train configs/dpo_lora.yaml "$@" --resume
jaxft eval configs/dpo_lora.yaml "$@" --overwrite
