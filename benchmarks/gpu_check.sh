#!/usr/bin/env bash
# The GPU figures of issue 23 in one run, on one CUDA card, in under ~9 minutes:
#   1. the `gpu`-marked tests of tests/engine (pytest; where the machine has none, a copy installed with
#      `pip install --target .gpu_deps pytest` next to the checkout is used),
#   2. benchmarks/bench_gpu.py: gpt2 and gpt2-xl, gpt2serve against transformers.
# Needs only torch, tokenizers, safetensors and transformers. Writes into OUTDIR: env.txt (the card and the
# versions), tests.log and tests.xml, bench_gpu.log (each engine's figures as they come) and bench_gpu.json.
#
#   benchmarks/gpu_check.sh OUTDIR        (from the repository root or anywhere)
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD:$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
TESTS_S=${GPU_CHECK_TESTS_S:-200}
BENCH_S=${GPU_CHECK_BENCH_S:-330}
# GPU_CHECK_BENCH_ARGS="--device cpu --sizes tiny --streams 4 --reps 1" checks this script on a CPU
read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:---device cuda --sizes gpt2,gpt2-xl --streams 16,64,256 --reps 3}"

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available()
    else 'no CUDA device')" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout "$TESTS_S" "$PY" -m pytest -q -m gpu tests/engine --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  rc=$?
  echo "gpu tests: exit $rc (124: timed out after ${TESTS_S} s)" | tee -a "$OUT/tests.log"
  [ "$rc" -eq 0 ] || status=1
else
  echo "pytest is not installed and no .gpu_deps/: the gpu tests did not run" | tee "$OUT/tests.log"
  status=1
fi
tail -5 "$OUT/tests.log"

timeout "$BENCH_S" "$PY" benchmarks/bench_gpu.py "${BENCH_ARGS[@]}" --out "$OUT/bench_gpu.json" > "$OUT/bench_gpu.stdout" 2> "$OUT/bench_gpu.log"
rc=$?
echo "bench_gpu.py: exit $rc (124: timed out after ${BENCH_S} s; bench_gpu.log has what finished)" \
  | tee -a "$OUT/bench_gpu.log"
[ "$rc" -eq 0 ] || status=1
exit $status
