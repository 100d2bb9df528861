#!/usr/bin/env bash
# Set up, lint, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The web demo's browser test drives Debian's headless Chromium; install it where we can (root + apt).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: chromium/chromium-driver not installed; the browser test will be skipped" >&2
  fi
fi
.venv/bin/ruff check picovlm tests benchmarks
.venv/bin/python -m pytest -q "$@"
