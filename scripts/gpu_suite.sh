#!/usr/bin/env bash
# One call on the GPU machine: the GPU test subset and the benchmarks, results under $OUT,
# a short table printed last. Usage (from the repo root, on the device):
#   STEPS="tests kernels attention generate" bash scripts/gpu_suite.sh
# Carried wheels in .whl/ (packages the device image lacks) are installed to /tmp/site first:
# gguf for the embedded model; for the engine and serving steps (which import the HTTP server)
# the server's pure-Python dependencies: uvicorn, starlette, httpx, httpcore, h11, anyio,
# sniffio, click, idna, certifi (the jax 0.11.2 image had no uvicorn, 2026-12-04).
# Steps: stage tests kernels sweep ptxas profile ncu probe mgpu_gather attention baseline decode
# xlaflags generate engine serving eval multigpu scaling (any order; the last two want several
# GPUs: docs/multihost.md).
# The embedded GGUF (98 MB) is over one call's carry limit: `split -n 2 -d` it into the
# git-ignored .stage/a and .stage/b and carry one per call; the "stage" step copies the carried
# part to /tmp/twc and joins the parts into $TWILIGHT_JAX_CACHE once both are there (files
# outside the checkout survive between back-to-back calls while the machine stays warm).
# The eval sweep lives in /tmp/eval-gpu (resumable across calls); $OUT/eval-gpu.tgz holds it.
# Step "baseline" runs the profile and attention steps (same PROFILE_ARGS / ATTN_ARGS) from an
# older tree in the git-ignored .baseline/, made with
#   mkdir -p .baseline && git archive REV pallas_kernels twilight_jax models scripts | tar -x -C .baseline
# and carried: the same machine and call as this tree's runs; results under $OUT/baseline-*.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
STEPS=${STEPS:-"tests kernels attention"}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Without preallocation the allocator's limit is still MEM_FRACTION of the device (0.75 by
# default): batch 64 / 128K holds a 44 GB cache and needs room beside it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false TWILIGHT_TEST_PLATFORM=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TWILIGHT_JAX_CACHE=${TWILIGHT_JAX_CACHE:-/tmp/twc/cache}
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF="$TWILIGHT_JAX_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
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
    stage)
      mkdir -p /tmp/twc "$TWILIGHT_JAX_CACHE"
      cp .stage/*/part* /tmp/twc/ 2>/dev/null
      ls -la /tmp/twc
      if [ ! -f "$GGUF" ] && [ -f /tmp/twc/part00 ] && [ -f /tmp/twc/part01 ]; then
        cat /tmp/twc/part00 /tmp/twc/part01 > "$GGUF.tmp" && mv "$GGUF.tmp" "$GGUF"
      fi
      if [ -f "$GGUF" ]; then
        echo "$GGUF_SHA256  $GGUF" | sha256sum -c -; rc=$?
      else
        echo "GGUF not complete yet (carry the other part next call)"; rc=0
      fi ;;
    decode)
      # One process per point: a point's cache is freed with its process (in one process the
      # allocator could not fit an 83 GB cache after a 21 GB one, 2026-12-04).
      rc=0
      for point in ${DECODE_POINTS:-8x32768}; do
        python3 scripts/bench_decode_step.py --profile --points "$point" \
          --out "$OUT/decode_step_$point" ${DECODE_ARGS:-} 2>&1 | grep -v "^W\|Warning\|return rule" \
          | tee -a "$OUT/decode.log" | grep -E "method=|FAILED|Error"
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      done ;;
    xlaflags)
      # The SmolLM2-shaped step at batch 1 is host-bound (3.3 ms a step for 1.4 ms of device
      # work, docs/generate.md): one process per XLA_FLAGS set (";"-separated), the same steps
      # in each, so step_ms compares the runtimes and logits_sum must agree. The default sets:
      # none, then XLA's command-buffer update modes (a CUDA graph re-recorded whenever a
      # buffer address changes could be the host time) and its exclusive-lock mode.
      DEFAULT_FLAG_SETS=";--xla_gpu_command_buffer_update_mode=NEVER_UPDATE"
      DEFAULT_FLAG_SETS+=";--xla_gpu_command_buffer_update_mode=CAPTURE_CMD_NEVER_UPDATE"
      DEFAULT_FLAG_SETS+=";--xla_gpu_require_exclusive_lock=true"
      rc=0; i=0
      IFS=';' read -ra flag_sets <<< "${XLA_FLAG_SETS:-$DEFAULT_FLAG_SETS}"
      for flags in "${flag_sets[@]}"; do
        echo "--- XLA_FLAGS='$flags'" | tee -a "$OUT/xlaflags.log"
        XLA_FLAGS="$flags" python3 scripts/bench_decode_step.py --shape smollm2 \
          --points 1x4096 64x4096 --methods dense twilight/quest --steps 20 --profile \
          --out "$OUT/xlaflags_$i" ${XLAFLAGS_ARGS:-} 2>&1 | grep -v "^W\|Warning\|return rule" \
          | tee -a "$OUT/xlaflags.log" | grep -E "method=|FAILED|Error"
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
        i=$((i + 1))
      done ;;
    multigpu)
      # The sharding checks (tests/multidevice_checks.py) on the GPUs themselves: 4 needed.
      python3 -m pytest -q -rs tests/multidevice_checks.py 2>&1 | tee "$OUT/multigpu.log" | tail -20
      rc=${PIPESTATUS[0]} ;;
    scaling)
      # The decode step split by KV head over 1, 2, 4 GPUs (docs/multihost.md); counts above
      # the GPUs present are skipped. One process per (count, point), as in "decode".
      rc=0
      gpus=$(nvidia-smi -L | wc -l)
      for n in ${SCALING_DEVICES:-1 2 4}; do
        [ "$n" -le "$gpus" ] || { echo "scaling: $n GPUs asked, $gpus present: skipped"; continue; }
        for point in ${SCALING_POINTS:-8x32768 32x32768 4x131072}; do
          python3 scripts/bench_decode_step.py --shape llama3-8b --layers 16 --points "$point" \
            --methods dense quest twilight/quest --steps 20 --devices "$n" \
            --out "$OUT/decode_step_${n}gpu_$point" ${SCALING_ARGS:-} 2>&1 \
            | grep -v "^W\|Warning\|return rule" | tee -a "$OUT/scaling.log" \
            | grep -E "method=|FAILED|Error"
          [ "${PIPESTATUS[0]}" = 0 ] || rc=1
        done
      done ;;
    engine)
      # eval: method names hold spaces, e.g. ENGINE_ARGS="--methods dense 'twilight/all p=0.95'".
      eval "python3 scripts/bench_engine.py --out \"\$OUT/engine\" ${ENGINE_ARGS:-}" 2>&1 \
        | tee "$OUT/engine.log" | tail -20
      rc=${PIPESTATUS[0]} ;;
    serving)
      python3 scripts/bench_serving.py --out "$OUT/serving" ${SERVING_ARGS:-} 2>&1 | tee "$OUT/serving.log" | tail -40
      rc=${PIPESTATUS[0]} ;;
    eval)
      python3 scripts/eval_accuracy.py --preset ${EVAL_PRESET:-gpu-core} --out /tmp/eval-gpu \
        --time-limit ${EVAL_LIMIT:-500} --compile-cache /tmp/jax_cache ${EVAL_ARGS:-} 2>&1 | tee -a "$OUT/eval.log" | tail -60
      rc=${PIPESTATUS[0]}
      # one archive: a device call returns only a few files
      tar czf "$OUT/eval-gpu.tgz" -C /tmp eval-gpu ;;
    tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu*.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
      rc=${PIPESTATUS[0]} ;;
    kernels)
      python3 scripts/bench_kernels.py --out "$OUT/kernels" ${KERNEL_ARGS:-} 2>&1 | tee "$OUT/kernels.log" | grep -v '^  kernel='
      rc=${PIPESTATUS[0]} ;;
    sweep)
      python3 scripts/bench_kernels.py --out "$OUT/sweep" --batches 64 --contexts 32768 --sweep --no-torch ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.log" | grep -v '^  kernel='
      rc=${PIPESTATUS[0]} ;;
    ptxas)
      # Registers and spills of every kernel at the batch 64 / 32K point: XLA dumps the PTX
      # (Pallas Triton kernels included), ptxas -v reports per function. For the top-p and
      # SpGEMV kernels, whose time does not follow their bytes or bisection steps.
      rm -rf /tmp/xla_dump
      XLA_FLAGS="--xla_dump_to=/tmp/xla_dump" python3 scripts/bench_kernels.py --batches 64 \
        --contexts 32768 --no-torch --out "$OUT/ptxas_kernels" > "$OUT/ptxas_bench.log" 2>&1
      rc=$?
      PTXAS=$(command -v ptxas || find / -name ptxas -type f -perm -u+x 2>/dev/null | head -n 1)
      echo "ptxas: ${PTXAS:-not found}; $(ls /tmp/xla_dump/*.ptx 2>/dev/null | wc -l) PTX files"
      for f in /tmp/xla_dump/*.ptx; do
        [ -n "$PTXAS" ] && [ -f "$f" ] || break
        # One line per function: name, registers, spill bytes.
        "$PTXAS" -arch=sm_90 -v "$f" -o /dev/null 2>&1 | awk -v file="$(basename "$f")" '
          /Compiling entry function/ { split($0, a, "'\''"); fn = a[2] }
          /spill stores/ { spill = $0; sub(/^ +/, "", spill) }
          /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/);
            print file ": " fn ": " substr($0, RSTART, RLENGTH) ", " spill }'
      done > "$OUT/ptxas.txt"
      # Ours (named after their pallas_call) and anything that spills.
      grep -E "topp|spgemv|quest|decode_attention|int4|[1-9][0-9]* bytes spill stores" \
        "$OUT/ptxas.txt" | sort -u | head -60 ;;
    profile)
      # Device time of every kernel of one decode_attention call (Pallas and XLA glue).
      python3 scripts/profile_attention.py --out /tmp/profile_attention ${PROFILE_ARGS:-} 2>&1 \
        | grep -v Warning | tee "$OUT/profile.log"
      rc=${PIPESTATUS[0]}
      cp /tmp/profile_attention/breakdown.json "$OUT/profile_breakdown.json" 2>/dev/null ;;
    ncu)
      # Hardware counters of our kernels inside one Twilight-over-Quest call: throughput,
      # occupancy, registers, local-memory (spill) traffic and warp stall reasons.
      stalls=""
      for s in long_scoreboard short_scoreboard barrier mio_throttle lg_throttle wait \
        math_pipe_throttle not_selected selected no_instruction branch_resolving membar \
        dispatch_stall drain imc_miss tex_throttle; do
        stalls="$stalls,smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio"
      done
      timeout 420 ncu --clock-control none -k "regex:${NCU_KERNELS:-spgemv|topp|quest_page|sparse_decode}" \
        -c ${NCU_COUNT:-5} --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        --metrics "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum${stalls}" \
        python3 scripts/profile_attention.py --ncu-once --methods ${NCU_METHODS:-twilight/quest} \
        ${PROFILE_ARGS:-} > "$OUT/ncu.txt" 2>&1
      rc=$?
      grep -E "^  [a-z_]+.*\(|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Block Limit|local_op|stalled|Warp Cycles Per Issued|Eligible Warps|No Eligible|Grid Size|Block Size|Waves" \
        "$OUT/ncu.txt" | sed -E 's/ +/ /g' | head -${NCU_LINES:-200} ;;
    probe)
      # Kernel-config variants inside the op, timed in rotation (scripts/probe_op_configs.py).
      python3 scripts/probe_op_configs.py --out "$OUT/probe" ${PROBE_ARGS:-} 2>&1 \
        | grep -v "Warning\|return rule" | tee "$OUT/probe.log"
      rc=${PIPESTATUS[0]} ;;
    mgpu_gather)
      # The SpGEMV's candidate pages moved by Mosaic GPU TMA copies, against the Triton kernel.
      python3 scripts/probe_mgpu_gather.py ${MGPU_ARGS:-} 2>&1 \
        | grep -v "Warning\|return rule" | tee "$OUT/mgpu_gather.log"
      rc=${PIPESTATUS[0]} ;;
    attention)
      python3 scripts/bench_attention.py --out "$OUT/attention" ${ATTN_ARGS:-} 2>&1 | tee "$OUT/attention.log"
      rc=${PIPESTATUS[0]} ;;
    baseline)
      if [ ! -d .baseline/pallas_kernels ]; then
        echo "baseline: no .baseline/ tree (git archive REV | tar -x -C .baseline, and carry it)"
        rc=2
      else
        (cd .baseline && PYTHONPATH="$PWD" python3 scripts/profile_attention.py \
          --out /tmp/profile_baseline ${PROFILE_ARGS:-} 2>&1 | grep -v Warning \
          | tee "$OUT/baseline-profile.log"
          PYTHONPATH="$PWD" python3 scripts/bench_attention.py --out "$OUT/baseline-attention" \
          ${ATTN_ARGS:-} 2>&1 | tee "$OUT/baseline-attention.log")
        rc=$?
      fi ;;
    generate)
      rc=0
      for n in ${GEN_PROMPTS:-4000}; do
        python3 scripts/bench_generate.py --prompt-tokens "$n" --out "$OUT/generate_$n" \
          ${GEN_ARGS:-} 2>&1 | grep -v "^W\|Warning\|return rule" | tee -a "$OUT/generate.log"
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      done ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
  summary+=("$step rc=$rc $(( $(date +%s) - t0 ))s")
done
echo "=== summary ==="
printf '%s\n' "${summary[@]}"
for f in "$OUT"/sweep.md "$OUT"/kernels.md "$OUT"/attention.md "$OUT"/decode_step*.md "$OUT"/generate*.md; do
  [ -f "$f" ] && { echo "--- $f"; tail -n +4 "$f"; }
done
# A device call returns at most 8 files: past that, everything travels as one archive.
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  tar czf /tmp/suite-results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete \
    && mv /tmp/suite-results.tgz "$OUT/results.tgz"
fi
exit 0
