#!/usr/bin/env bash
# Set up a virtual environment in .venv with softprompt installed (editable).
#   bash scripts/setup.sh          # runtime dependencies, serving included (softprompt serve)
#   bash scripts/setup.sh --dev    # plus test and lint dependencies (peft, openai, hypothesis, ruff, mypy, ...)
# torch is pinned to the local CPU build first, and the constraints file keeps any later
# install from pulling another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="[serve]"
[ "${1:-}" = "--dev" ] && extra="[serve,dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null
$py -c "import torch" 2>/dev/null || $py -m pip install -q -c scripts/constraints.txt torch==2.13.0
$py -m pip install -q -c scripts/constraints.txt -e ".${extra}"
echo "softprompt is set up in .venv (python: $($py --version))"
