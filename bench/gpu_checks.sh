#!/usr/bin/env bash
# GPU checks for one device call: the shared kernel test body compiled, a stress run, a Mosaic GPU
# tile/register sweep and the side-by-side benchmark, each step optional.
#
#   bash bench/gpu_checks.sh [tests] [stress] [sweep] [flex]   # repo root on the GPU machine; files in $OUT
#
#   tests  pytest tests/kernels/test_kernels.py -k <backend> for each of $TESTS_K (default "mosaic triton")
#          on the GPU (HYPOTHESIS_PROFILE=gpu, verbose, slowest 5) -> $OUT/gpu_tests_<backend>.log
#   sweep  bench/mgpu_dev.py time at $SWEEP_SHAPES (default 2x8192), both masks, over $SWEEP_CONFIGS (JSON list of
#          Config options; an "_env" dict in one sets variables while it is traced) for each setmaxnreg split in $SWEEP_REGS (producer,consumer; "" = the default),
#          with ptxas' register/spill report -> $OUT/sweep_<regs>.log (GPU ms per kernel from the profiler)
#   stress bench/mgpu_dev.py stress at 1x2048, both masks, $STRESS_ITERS iterations of fresh data against the
#          fp32 reference (split and joint calls, hang watchdog) -> $OUT/stress_<mask>.log
#   flex   bench/kernels.py at $FLEX_SHAPES for $FLEX_IMPLS (default pallas_mosaic_gpu, cuDNN, Flex), the
#          fp32-reference check at $CHECK_SHAPE (default none) -> $OUT/kernels_*.{json,md}, flex.log
# Each step runs under `timeout` ($TESTS_S, $STRESS_S, $SWEEP_S, $FLEX_S seconds).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_checks_out}"
mkdir -p "$OUT"
steps="${*:-tests sweep}"
configs="${SWEEP_CONFIGS:-}"
[ -n "$configs" ] || configs='[{}]'
for step in $steps; do
  echo "=== $step $(date +%T)"
  case "$step" in
    tests)
      for k in ${TESTS_K:-mosaic triton}; do
        JAX_PLATFORMS=cuda HYPOTHESIS_PROFILE=gpu timeout "${TESTS_S:-280}" python3 -m pytest -v --tb=short \
          --durations=5 -p no:randomly -p no:cacheprovider tests/kernels/test_kernels.py -k "$k" \
          >"$OUT/gpu_tests_$k.log" 2>&1
        echo "tests $k rc=$?"; grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests_$k.log" | tail -20
      done ;;
    stress)
      for mask in spattention_exclusive spattention; do
        timeout "${STRESS_S:-120}" python3 bench/mgpu_dev.py stress --shapes 1x2048 --masks "$mask" \
          --iters "${STRESS_ITERS:-4}" --no-gdb --out "$OUT" >"$OUT/stress_$mask.log" 2>&1
        echo "stress $mask rc=$?"; grep -E "^iter|RESULT|HANG|hang" "$OUT/stress_$mask.log" | tail -8
      done ;;
    sweep)
      for regs in ${SWEEP_REGS:-default}; do
        [ "$regs" = default ] && r="" || r="$regs"
        SPATTN_MGPU_REGS="$r" MOSAIC_GPU_DUMP_PTXAS=1 timeout "${SWEEP_S:-200}" python3 bench/mgpu_dev.py time \
          --no-cudnn --shapes "${SWEEP_SHAPES:-2x8192}" --configs "$configs" \
          >"$OUT/sweep_${regs/,/_}.log" 2>&1
        echo "sweep $regs rc=$?"; grep -E "^\S*time |kernels µs" "$OUT/sweep_${regs/,/_}.log" | cut -c1-260
      done ;;
    flex)
      timeout "${FLEX_S:-200}" python3 bench/kernels.py --shapes "${FLEX_SHAPES:-2x8192}" \
        --impls "${FLEX_IMPLS:-pallas_mosaic_gpu,cudnn,flex}" --check-shape "${CHECK_SHAPE:-}" --no-odd-checks --out "$OUT" \
        --tag "${FLEX_TAG:-checks}" >"$OUT/flex.log" 2>&1
      echo "flex rc=$?"; tail -30 "$OUT/flex.log" ;;
  esac
done
