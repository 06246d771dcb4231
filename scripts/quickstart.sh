#!/usr/bin/env bash
# The main job on the embedded default: LoRA SFT of SmolLM2-135M-Instruct on the shipped
# JSON-extraction task, then base vs tuned on held-out examples. Re-running it resumes / re-evaluates.
# Extra arguments are config overrides, e.g. `bash scripts/quickstart.sh train.steps=20`.
. "$(dirname "$0")/_venv.sh" test   # torch + peft for the final PyTorch check
set -x
jaxft task-data runs/quickstart/data
jaxft train configs/quickstart.yaml "$@" --resume
jaxft export runs/quickstart --format peft --out runs/quickstart/adapter --overwrite
jaxft export runs/quickstart --format gguf --gguf-type q8_0 --out runs/quickstart/model-q8_0.gguf --overwrite
# base vs tuned, the regression check against the base, and what the q8_0 GGUF costs against the fp32 tuned
# model (KL, top-1 agreement, the task metric) in one table and one report (runs/quickstart/eval/report.md)
jaxft eval configs/quickstart.yaml "$@" --overwrite --compare-export runs/quickstart/model-q8_0.gguf
python scripts/check_peft_export.py runs/quickstart
