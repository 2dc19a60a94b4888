#!/usr/bin/env bash
# One-call H100 diagnosis of the Pallas Mosaic GPU band kernel (bench/NOTES_mgpu.md, "Diagnosis script").
#
#   bash bench/mgpu_diag.sh          # from the repo root on the device machine, $OUT set by the device tool
#
# Steps, most important first, each under `timeout` and all under one wall-clock budget
# (MGPU_DIAG_BUDGET seconds, default 460; a step that would start with < 25 s left is skipped):
#   a1  stress: 1x2048 spattention_exclusive (the shape that hung), 20 iterations of fresh random data
#       against the fp32 reference, alternating split (fwd, dQ, dK/dV synchronised one by one) and joint
#       (jax.vjp) calls; a watchdog names the stage of a hang and attaches cuda-gdb (kernel, blocks,
#       SASS at each warpgroup's PC); after a hang the remaining iterations rerun in a new process.
#       MOSAIC_GPU_DUMP_PTXAS=1 puts ptxas' register / spill report of every kernel in the log.
#   a2  only if a1 hung: 10 more iterations with setmaxnreg 56/224 instead of 40/232 (SPATTN_MGPU_REGS).
#   a3  compute-sanitizer --tool synccheck on 2 split iterations (no reference, no cuda-gdb).
#   b   ncu (--clock-control none) of the forward, dQ and dK/dV kernels at 2x8192, H=16, D=128, both masks:
#       SpeedOfLight, Occupancy, WarpStateStats, MemoryWorkloadAnalysis, ComputeWorkloadAnalysis,
#       LaunchStats; `--csv --page details` text, summarised by `mgpu_dev.py ncusum`.
#   c   1x65536 forward and forward+backward of both masks (time stage, 3 iterations).
#   d   persistent CTAs: stress 1x2048 with num_ctas=132 (2 units per CTA), then, if it did not hang,
#       2x8192 timing of num_ctas 0 vs 132.
#   e   ptxas + SASS dump of the three kernels (1x2048), with instruction counts (setmaxnreg, spills).
#   f   compute-sanitizer --tool racecheck on 1 split iteration, if time is left.
# Files back in $OUT (8 at most): diag_summary.txt, a_stress.log, a_sanitizer.log, b_ncu_details.csv,
# c_big.log, d_persistent.log, e_dump.log, extras.tar.gz (JSON rows, cuda-gdb logs, ncu stdout, dumps).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT="${OUT:-/tmp/mgpu_diag_out}"
WORK="$(mktemp -d /tmp/mgpu_diag.XXXXXX)"
mkdir -p "$OUT"
PY="${MGPU_DIAG_PY:-python3}"
DEV="bench/mgpu_dev.py"
BUDGET="${MGPU_DIAG_BUDGET:-460}"
START=$(date +%s)
SUM="$OUT/diag_summary.txt"
: >"$SUM"

note() { echo "$*" | tee -a "$SUM"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME MAX_SECONDS LOGFILE CMD... : run CMD with timeout min(MAX, budget left - 10), append its
# output to LOGFILE (stdout shows the last 15 lines), record rc and seconds in the summary.
# Returns CMD's status (124/137: timed out; 99: skipped for the budget).
step() {
  local name=$1 max=$2 logf=$3
  shift 3
  local l=$(($(left) - 10))
  if ((l < 25)); then
    note "[$name] SKIPPED: $(left)s of the budget left"
    return 99
  fi
  local t=$((max < l ? max : l))
  echo "=== [$name] $(date +%T) timeout ${t}s: $*" >>"$logf"
  local t0=$(date +%s)
  timeout -k 10 "$t" "$@" >>"$logf" 2>&1
  local rc=$?
  note "[$name] rc=$rc in $(($(date +%s) - t0))s (timeout ${t}s)$([ $rc = 124 ] || [ $rc = 137 ] && echo ' TIMED OUT')"
  tail -n 15 "$logf" | sed "s/^/  [$name] /"
  return $rc
}

note "# mgpu_diag $(date -u +%FT%TZ) budget ${BUDGET}s"
note "$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader 2>&1 | head -2)"
note "tools: ncu=$(command -v ncu || echo none) compute-sanitizer=$(command -v compute-sanitizer || echo none) cuda-gdb=$(command -v cuda-gdb || echo none)"
note "$($PY -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices()[0].device_kind)' 2>&1 | tail -1)"

# -- a1: the intermittent hang -----------------------------------------------------------------------------
A="$OUT/a_stress.log"
done_iters=0
hangs=0
runs=0
while ((done_iters < 20 && runs < 2)); do # one rerun after a hang, for the remaining iterations
  runs=$((runs + 1))
  n0=$(wc -l <"$A" 2>/dev/null || echo 0)
  MOSAIC_GPU_DUMP_PTXAS=1 step "a1 stress run $runs" 150 "$A" \
    $PY $DEV stress --shapes 1x2048 --masks spattention_exclusive --iters $((20 - done_iters)) \
    --seed0 $((1000 + done_iters)) --modes split,joint --stall-s 20 --compile-s 100 --out "$WORK"
  rc=$?
  [ -f "$WORK/mgpu_hang_gdb.log" ] && mv "$WORK/mgpu_hang_gdb.log" "$WORK/a1_run${runs}_hang_gdb.log"
  res=$(tail -n +$((n0 + 1)) "$A" | grep '^RESULT' | tail -1)
  note "  a1 run $runs: ${res:-no RESULT line}"
  p=$(echo "$res" | sed -n 's/.*pass=\([0-9]*\).*/\1/p')
  f=$(echo "$res" | sed -n 's/.*fail=\([0-9]*\).*/\1/p')
  done_iters=$((done_iters + ${p:-0} + ${f:-0}))
  if [ "$rc" = 3 ]; then
    hangs=$((hangs + 1))
    done_iters=$((done_iters + 1))
    echo "$res" | grep -q 'hang_stage=compile' && break # the compile itself stalled: a rerun shows nothing new
  elif [ "$rc" != 0 ]; then
    break
  fi
done
note "a1 TOTAL: iterations finished or hung=$done_iters, hangs=$hangs, passes/fails per run above; hang stages: $(grep -o 'hang_stage=.*' "$A" | tr '\n' ';')"

# -- a2: register split, only after a hang ---------------------------------------------------------------------
if ((hangs > 0 && $(left) > 300)); then
  n0=$(wc -l <"$A")
  SPATTN_MGPU_REGS=56,224 MOSAIC_GPU_DUMP_PTXAS=1 step "a2 stress regs 56/224" 120 "$A" \
    $PY $DEV stress --shapes 1x2048 --masks spattention_exclusive --iters 10 --seed0 2000 \
    --modes split,joint --stall-s 20 --compile-s 80 --out "$WORK"
  note "  a2: $(tail -n +$((n0 + 1)) "$A" | grep '^RESULT' | tail -1)"
  [ -f "$WORK/mgpu_hang_gdb.log" ] && mv "$WORK/mgpu_hang_gdb.log" "$WORK/a2_hang_gdb.log"
fi

# -- a3: synccheck --------------------------------------------------------------------------------------------
S="$OUT/a_sanitizer.log"
SAN_FILTER=()
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --help 2>&1 | grep -q -- '--kernel-name' && SAN_FILTER=(--kernel-name kns=_kernel)
  sanitize() { # TOOL NAME MAX ITERS
    step "$2" "$3" "$S" \
      compute-sanitizer --tool "$1" ${SAN_FILTER[@]+"${SAN_FILTER[@]}"} --print-limit 20 \
      $PY $DEV stress --shapes 1x2048 --masks spattention_exclusive --iters "$4" --modes split --no-ref --no-gdb \
      --stall-s 25 --compile-s 80 --out "$WORK"
  }
  n0=$(wc -l <"$S" 2>/dev/null || echo 0)
  sanitize synccheck "a3 synccheck" 110 2
  if ((${#SAN_FILTER[@]})) && tail -n +$((n0 + 1)) "$S" | grep -qiE 'unrecognized|invalid (option|value|argument)|unknown option'; then
    SAN_FILTER=() # the kernel filter syntax was refused: run unfiltered
    sanitize synccheck "a3 synccheck (no kernel filter)" 110 2
  fi
  note "  a3: $(tail -n +$((n0 + 1)) "$S" | grep -E 'ERROR SUMMARY|RESULT|HANG' | tr '\n' ' ')"
else
  note "[a3] compute-sanitizer not found"
fi

# -- b: ncu ---------------------------------------------------------------------------------------------------
B="$OUT/b_ncu_details.csv"
if command -v ncu >/dev/null; then
  step "b ncu 2x8192" 170 "$WORK/b_ncu_app.log" \
    ncu --clock-control none -k 'regex:(fwd|dq|dkv)_kernel|mosaic' --launch-count 6 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section LaunchStats --csv --page details --log-file "$B" \
    $PY $DEV profile --shapes 2x8192 --masks spattention,spattention_exclusive --out "$WORK"
  note "  b: $(grep -c '"Duration"' "$B" 2>/dev/null || true) kernels profiled"
  $PY $DEV ncusum --csv "$B" 2>&1 | grep '^|' | tee -a "$SUM"
  grep '^profile' "$WORK/b_ncu_app.log" | tee -a "$SUM"
else
  note "[b] ncu not found"
fi

# -- c: 1x65536 -----------------------------------------------------------------------------------------------
C="$OUT/c_big.log"
step "c 1x65536" 120 "$C" $PY $DEV time --shapes 1x65536 --no-cudnn --iters 3 --out "$WORK"
grep -E '^time|^\|' "$C" | tee -a "$SUM"

# -- d: persistent CTAs ---------------------------------------------------------------------------------------
D="$OUT/d_persistent.log"
step "d1 stress num_ctas=132" 100 "$D" \
  $PY $DEV stress --shapes 1x2048 --masks spattention_exclusive --iters 4 --modes split,joint \
  --options '{"num_ctas": 132}' --stall-s 20 --compile-s 80 --out "$WORK"
drc=$?
note "  d1: $(grep '^RESULT' "$D" | tail -1)"
[ -f "$WORK/mgpu_hang_gdb.log" ] && mv "$WORK/mgpu_hang_gdb.log" "$WORK/d1_hang_gdb.log"
if [ "$drc" = 0 ]; then
  step "d2 time 2x8192 num_ctas 0 vs 132" 90 "$D" \
    $PY $DEV time --shapes 2x8192 --no-cudnn --iters 10 --configs '[{"num_ctas": 0}, {"num_ctas": 132}]' --out "$WORK"
  grep -E '^time|^\|' "$D" | tee -a "$SUM"
else
  note "[d2] skipped: the persistent stress did not pass cleanly (rc=$drc)"
fi

# -- e: ptxas + SASS ------------------------------------------------------------------------------------------
E="$OUT/e_dump.log"
MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 step "e dump" 60 "$WORK/e_dump_full.txt" \
  $PY $DEV profile --shapes 1x2048 --masks spattention_exclusive --out "$WORK"
if [ -s "$WORK/e_dump_full.txt" ]; then
  {
    echo "# ptxas reports"
    grep -iE 'ptxas|registers|spill|stack frame|Compiling entry|bytes smem' "$WORK/e_dump_full.txt" | head -60
    echo "# SASS instruction counts (whole dump: the three kernels)"
    for ins in USETMAXREG HGMMA WARPGROUP.ARRIVE SYNCS.ARRIVE SYNCS.PHASECHK UTMALDG UTMASTG BAR.SYNC BAR.ARV STL LDL; do
      echo "$ins $(grep -c "$ins" "$WORK/e_dump_full.txt")"
    done
  } >"$E" 2>&1
  cat "$E" | tail -n 30 | tee -a "$SUM" >/dev/null
fi

# -- f: racecheck (lowest priority) ---------------------------------------------------------------------------
if command -v compute-sanitizer >/dev/null; then
  n0=$(wc -l <"$S" 2>/dev/null || echo 0)
  sanitize racecheck "f racecheck" 110 1
  note "  f: $(tail -n +$((n0 + 1)) "$S" | grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|RESULT|HANG' | tr '\n' ' ')"
fi

# -- bundle ---------------------------------------------------------------------------------------------------
gzip -9 -f "$WORK/e_dump_full.txt" 2>/dev/null
tar -czf "$OUT/extras.tar.gz" -C "$WORK" . 2>/dev/null
note "extras.tar.gz: $(tar -tzf "$OUT/extras.tar.gz" 2>/dev/null | tr '\n' ' ')"
note "# done in $(($(date +%s) - START))s"
for f in "$OUT"/*; do
  s=$(stat -c %s "$f")
  if ((s > 15000000)); then # keep every file under the 16 MiB transfer limit
    head -c 15000000 "$f" >"$f.tmp" && mv "$f.tmp" "$f"
    note "truncated $(basename "$f") from $s bytes"
  fi
done
echo "===================== diag_summary.txt ====================="
cat "$SUM"
