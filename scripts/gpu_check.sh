#!/usr/bin/env bash
# The GPU check (issue 23, item 7): CUDA-marked tests on tiny models, then the Llama-3-8B-shaped benchmark
# (research/gpu.py). Run it on a lent GPU machine, never in CI; at most 11.5 minutes (the timeouts below).
#
#   bash scripts/gpu_check.sh wheels   # here, with network: the wheels the GPU image lacks, into .whl/ (gitignored)
#   bash scripts/gpu_check.sh          # there, from the repository root, with .whl carried: writes to $OUT
#
# The GPU image has torch 2.11 and transformers 5.17 and no network; the wheels below bring the versions
# softprompt is tested with (pure Python except pydantic-core, built for the image's CPython 3.12).
# Outputs under $OUT (default ./out): environment.txt, cuda-tests.xml (JUnit), cuda-tests.log, gpu_bench.json,
# gpu_bench.log, gpu_decode.json, gpu_decode.log. See docs/benchmarks.md.
set -uo pipefail

WHEELS=(
  transformers==5.23.0 peft==0.21.2
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 opentelemetry-api==1.45.3
)

if [[ "${1:-}" == "wheels" ]]; then
  set -e
  mkdir -p .whl
  for wheel in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$wheel"
  done
  du -sh .whl
  exit 0
fi

OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site
else
  echo "no .whl/ here: using the image's packages (bash scripts/gpu_check.sh wheels makes it)"
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('transformers', transformers.__version__, 'peft', peft.__version__); print('gpu', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/environment.txt"

status=0
# Tiny-model CUDA tests (a minute or two): parity with the CPU, bfloat16, mixed batches, checkpointing, serving.
timeout 180 python3 -m pytest -q -p no:cacheprovider -m cuda tests/engine/test_cuda.py \
  --junitxml="$OUT/cuda-tests.xml" 2>&1 | tee "$OUT/cuda-tests.log" || status=1
# The 8B-shaped benchmark (a few minutes): training steps against PEFT, generation throughput at batch 64.
timeout 330 python3 -m research.gpu --part training --part generation --out "$OUT/gpu_bench.json" 2>&1 \
  | tee "$OUT/gpu_bench.log" || status=1
# Issue 27's decode table on the same shape (one stream; compiles twice), last so a timeout loses only it.
timeout 180 python3 -m research.gpu --part decode --out "$OUT/gpu_decode.json" 2>&1 \
  | tee "$OUT/gpu_decode.log" || status=1
exit $status
