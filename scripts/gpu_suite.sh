#!/usr/bin/env bash
# One call on the GPU machine: the GPU test subset and the benchmarks, results under $OUT,
# a short table printed last. Usage (from the repo root, on the device):
#   STEPS="tests kernels attention generate" bash scripts/gpu_suite.sh
# Carried wheels in .whl/ (packages the device image lacks) are installed to /tmp/site first.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
STEPS=${STEPS:-"tests kernels attention"}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false TWILIGHT_TEST_PLATFORM=cuda
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee -a "$OUT/gpu.txt"
summary=()
for step in $STEPS; do
  t0=$(date +%s)
  case $step in
    tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu*.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
      rc=${PIPESTATUS[0]} ;;
    kernels)
      python3 scripts/bench_kernels.py --out "$OUT/kernels" ${KERNEL_ARGS:-} 2>&1 | tee "$OUT/kernels.log" | grep -v '^  kernel='
      rc=${PIPESTATUS[0]} ;;
    sweep)
      python3 scripts/bench_kernels.py --out "$OUT/sweep" --batches 64 --contexts 32768 --sweep --no-torch 2>&1 | tee "$OUT/sweep.log" | grep -v '^  kernel='
      rc=${PIPESTATUS[0]} ;;
    attention)
      python3 scripts/bench_attention.py --out "$OUT/attention" ${ATTN_ARGS:-} 2>&1 | tee "$OUT/attention.log"
      rc=${PIPESTATUS[0]} ;;
    generate)
      python3 scripts/bench_generate.py --out "$OUT/generate" ${GEN_ARGS:-} 2>&1 | tee "$OUT/generate.log"
      rc=${PIPESTATUS[0]} ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
  summary+=("$step rc=$rc $(( $(date +%s) - t0 ))s")
done
echo "=== summary ==="
printf '%s\n' "${summary[@]}"
for f in "$OUT"/sweep.md "$OUT"/kernels.md "$OUT"/attention.md "$OUT"/generate.md; do
  [ -f "$f" ] && { echo "--- $f"; tail -n +4 "$f"; }
done
exit 0
