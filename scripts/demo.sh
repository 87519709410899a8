#!/usr/bin/env bash
# The README's main-job command: creates/updates .venv, then runs the whole ELREA pipeline on the
# embedded skill mixture with the default backbone (SmolLM2-135M-Instruct) and prints the results.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/elrea-hf demo "$@"
