#!/usr/bin/env bash
# Set up, lint, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check picovlm tests benchmarks
.venv/bin/python -m pytest -q "$@"
