#!/usr/bin/env bash
# The whole test suite, on CPU, in ./.venv (created and installed here).
. "$(dirname "$0")/_venv.sh" test
# The CPU's bf16 / AMX extensions change which kernels some references (bitsandbytes) would pick; the
# tests pin those paths, and this line records what the run had, for comparing CI machines.
flags=$(grep -o -w 'avx512_bf16\|amx_bf16\|amx_tile\|amx_int8\|avx512f' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ')
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs); flags: ${flags:-none of avx512f/avx512_bf16/amx}"
exec python -m pytest -q "$@"
