#!/usr/bin/env bash
# Same-call A/B of the Mosaic GPU kernels on one GPU machine: a copy of another tree (the "old" side,
# $AB_OLD, e.g. `mkdir ab_old && git archive HEAD spattn_jax bench | tar -x -C ab_old`) against this
# tree, timed in separate processes, alternated over $AB_ROUNDS rounds so that drift shows.
#
#   bash bench/mgpu_ab.sh [time] [check] [ncu]     # repo root on the GPU machine; files in $OUT
#
#   time   bench/mgpu_dev.py time at $AB_SHAPES (default 2x8192), both masks, old and new alternated,
#          with ptxas' register/spill report -> $OUT/time_{old,new}<round>.log; prints GPU us per kernel
#   check  bench/mgpu_dev.py check --cases $AB_CASES (default 0,2,3) on the new side -> $OUT/check_new.log
#   ncu    ncu metrics of each kernel once per mask, old and new: time, shared-memory carve-out and
#          allocation, local-memory (register spill) sectors and their L1 hits -> $OUT/ncu_{old,new}.csv
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/mgpu_ab_out}"
mkdir -p "$OUT"
new="$PWD"
old="$PWD/${AB_OLD:-ab_old}"
[ -f "$old/bench/mgpu_dev.py" ] || { echo "no old tree at $old (set AB_OLD)"; exit 2; }
for step in ${*:-time check}; do
  echo "=== $step $(date +%T)"
  case "$step" in
    time)
      for r in $(seq "${AB_ROUNDS:-2}"); do
        for side in old new; do
          [ "$side" = old ] && root="$old" || root="$new"
          log="$OUT/time_$side$r.log"
          MOSAIC_GPU_DUMP_PTXAS=1 PYTHONPATH="$root" timeout "${AB_S:-150}" python3 "$root/bench/mgpu_dev.py" time \
            --no-cudnn --shapes "${AB_SHAPES:-2x8192}" --iters "${AB_ITERS:-10}" --out "/tmp/ab_$side$r" >"$log" 2>&1
          echo "$side$r rc=$? spills: $(grep -o '[0-9]* bytes spill stores' "$log" | cut -d' ' -f1 | tr '\n' ' ')"
          grep -E "^\S*time |kernels µs" "$log" | cut -c1-220
        done
      done ;;
    check)
      PYTHONPATH="$new" timeout "${AB_CHECK_S:-150}" python3 bench/mgpu_dev.py check --cases "${AB_CASES:-0,2,3}" \
        --out /tmp/ab_check >"$OUT/check_new.log" 2>&1
      echo "check rc=$?"; grep -E "^check|ok=|RESULT" "$OUT/check_new.log" | tail -12 ;;
    ncu)
      # One launch per kernel and mask; a few metrics only (L1 hit rate of local loads: register spills).
      metrics=gpu__time_duration.sum,launch__shared_mem_config_size,launch__shared_mem_per_block_dynamic,${AB_NCU_METRICS:-l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_local_op_ld_lookup_hit.sum,l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum}
      for side in old new; do
        [ "$side" = old ] && root="$old" || root="$new"
        PYTHONPATH="$root" timeout -k 5 "${AB_NCU_S:-150}" ncu --clock-control none -k 'regex:mosaic' --launch-count 6 \
          --metrics "$metrics" --csv --page raw --log-file "$OUT/ncu_$side.csv" \
          python3 "$root/bench/mgpu_dev.py" profile --shapes 2x8192 --masks spattention,spattention_exclusive \
          --out "/tmp/ab_ncu_$side" >"/tmp/ab_ncu_$side.log" 2>&1
        echo "ncu $side rc=$? kernels=$(grep -c mosaic "$OUT/ncu_$side.csv")"
        # A killed ncu leaves its target holding the GPU. The pattern is anchored at the target's argv[0]:
        # a bare "mgpu_dev.py profile" also matches any shell whose command line contains it (and kills it).
        pkill -9 -f "^python3 [^ ]*mgpu_dev.py profile" 2>/dev/null; sleep 1
        grep -E "^profile|ERR|rror" "/tmp/ab_ncu_$side.log" | head -4
        python3 bench/mgpu_dev.py ncusum --csv "$OUT/ncu_$side.csv" 2>&1 | grep -v "^#"
      done ;;
  esac
done
