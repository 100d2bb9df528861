#!/usr/bin/env bash
# Set up, then train supravl-nano on the built-in shapes dataset for a few minutes and caption.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/picovlm demo "$@"
