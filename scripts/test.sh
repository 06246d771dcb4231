#!/usr/bin/env bash
# The whole test suite, on CPU, in ./.venv (created and installed here).
. "$(dirname "$0")/_venv.sh" test
exec python -m pytest -q "$@"
