#!/usr/bin/env bash
# GRPO example on the embedded default: LoRA GRPO of the base SmolLM2-135M-Instruct on the quickstart task with
# the json_fields reward (configs/grpo_lora.yaml: 20 steps of 2 prompts x 8 completions), then held-out
# valid-JSON / exact / field accuracy, base vs tuned, and the PEFT export. Re-running resumes / re-evaluates.
# Extra arguments are config overrides, e.g. `bash scripts/grpo_example.sh train.steps=40`; to start from an
# SFT adapter instead: `lora.init_adapter=runs/quickstart/adapter` (then "base" in the table is that adapter).
. "$(dirname "$0")/_venv.sh"
set -x
jaxft task-data runs/grpo/data
jaxft train configs/grpo_lora.yaml "$@" --resume
jaxft eval configs/grpo_lora.yaml "$@" --overwrite
jaxft export runs/grpo --format peft --out runs/grpo/adapter --overwrite
