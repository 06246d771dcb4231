#!/usr/bin/env bash
# The main job on the embedded default: fetch SmolLM2-135M-Instruct (once) and chat with it.
# Non-interactive: `echo "Name three primary colors." | bash scripts/quickstart.sh`
. "$(dirname "$0")/_venv.sh"
exec jaxft chat example --max-new-tokens 128 "$@"
