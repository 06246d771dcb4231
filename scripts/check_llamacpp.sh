#!/usr/bin/env bash
# llama.cpp (llama-cpp-python, in a virtualenv of its own) answers with jaxft's GGUF exports as jaxft does.
#   bash scripts/check_llamacpp.sh [RUN]     # no RUN: a tiny random model trained 4 steps
#   bash scripts/check_llamacpp.sh --families  # f32 GGUFs of tiny gemma / gemma3: llama.cpp logits vs jaxft
# llama-cpp-python is source-only on the package registry: its wheel is built once (~15 min on 2 cores:
# portable, no native-CPU code, no multimodal parts) and cached in $JAXFT_CACHE/wheels.
. "$(dirname "$0")/_venv.sh" test
CACHE=${JAXFT_CACHE:-$HOME/.cache/jaxft}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -n "${1:-}" ]; then python scripts/check_llamacpp.py prepare "$1" "$WORK"; else
  python scripts/check_llamacpp.py prepare --tiny "$WORK"; fi
VENV="$CACHE/venv-llamacpp"
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  mkdir -p "$CACHE/wheels"
  if ! ls "$CACHE"/wheels/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python 0.3.36 (once; cached in $CACHE/wheels)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
      python -m pip wheel -q --no-deps "llama-cpp-python==0.3.36" -w "$CACHE/wheels"
  fi
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$CACHE"/wheels/llama_cpp_python-0.3.36-*.whl numpy diskcache jinja2 \
    typing-extensions
fi
"$VENV/bin/python" scripts/check_llamacpp.py serve "$WORK"
