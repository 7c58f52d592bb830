#!/usr/bin/env bash
# Run the engine, method, adapter-format and server tests against the newest transformers that installs,
# in a separate environment (.venv-next), next to the pinned set of scripts/constraints.txt (.venv).
#   bash scripts/test_newest_transformers.sh                     # default test paths
#   bash scripts/test_newest_transformers.sh tests/engine/test_model.py  # any pytest arguments
# Only torch (the local CPU build) and deepspeed (a source build, not what is under test here) stay at their
# pinned versions; PEFT stays at the version pyproject's dev extra pins. Everything else resolves afresh, so
# transformers, tokenizers, huggingface_hub and safetensors are the newest releases that install together.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-next
py=$venv/bin/python
start=$SECONDS

[ -x $py ] || python3 -m venv $venv
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
grep -E '^(torch|deepspeed)==' scripts/constraints.txt >"$pins"
$py -m pip install -q --upgrade pip >/dev/null
$py -c "import torch" 2>/dev/null || $py -m pip install -q -c "$pins" "$(grep -E '^torch==' "$pins")"
$py -m pip install -q -c "$pins" -e ".[serve,dev]"
$py -m pip install -q -c "$pins" --upgrade transformers
setup_s=$((SECONDS - start))
# Test this checkout's package (the editable install points here too; a PYTHONPATH set outside would win over it).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

echo "== newest transformers set (set-up ${setup_s} s):"
$py - <<'EOF'
from importlib.metadata import version

import softprompt

print("   " + ", ".join(f"{name} {version(name)}" for name in
      ("transformers", "torch", "peft", "tokenizers", "huggingface_hub", "safetensors", "accelerate")))
print(f"   softprompt from {softprompt.__file__}")
EOF

[ $# -gt 0 ] || set -- tests/engine tests/methods tests/adapters tests/server
tests_start=$SECONDS
status=0
$py -m pytest -q -p no:cacheprovider "$@" || status=$?
echo "== tests took $((SECONDS - tests_start)) s (set-up ${setup_s} s); pytest exit status ${status}"
exit $status
