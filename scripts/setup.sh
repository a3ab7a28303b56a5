#!/usr/bin/env bash
# Create .venv with everything the backend, the command line and the tests need.
#   bash scripts/setup.sh          # runtime + test dependencies
# torch 2.14.1 / torchvision 0.29.1 are pinned; on a CPU-only machine you may prefer the CPU wheels:
#   PIP_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   (torch only)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
# The project itself, editable: `python -m matcher_core` and `oneshot-segment` from any folder.
.venv/bin/python -m pip install --quiet --no-deps -e .
echo "ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
