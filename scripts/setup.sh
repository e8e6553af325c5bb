#!/usr/bin/env bash
# Create .venv and install llamaduo with everything it needs, CPU-only by default.
# Usage: bash scripts/setup.sh [--test|--gguf]   (--gguf adds llama.cpp for GGUF export; --test adds it and Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
# GPU users: install the CUDA build of torch>=2.6 yourself first; this line then changes nothing.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[all,dev]"
# GGUF export and the llama.cpp tests: llama-cpp-python (a source build, ~5-10 min on 2 cores; pip
# caches the wheel) and llama.cpp's converter from the same version's source package.
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--gguf" ]; then
  python -m pip install -q -e ".[interop]"
  python -m llamaduo.gguf fetch
fi
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "note: chromium not installed; the report browser test will be skipped"
  else
    echo "note: install Debian's chromium for the report browser test (it is skipped without it)"
  fi
fi
echo "llamaduo installed in .venv"
