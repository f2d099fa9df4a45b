#!/usr/bin/env bash
# One device call that trains several runs at once on one GPU, then evaluates each again from its
# model.pt and final.pt, draws the first run's pictures and, if time is left, runs the GPU bench.
# Everything small comes back through $OUT: runs.tgz (every run's config/metrics/summary and
# logs), vis.tgz, the first run's model.pt in 15 MB parts, device.log, bench-cuda.jsonl (bench-cpu.jsonl in a dry run).
#
#   JOBS: one run per line, "NAME FLAGS..." (the flags of `capsnet train`; lines starting with # are
#   skipped, so a file of tools/jobs/ can be passed whole: JOBS="$(cat tools/jobs/F)"). Default: the default
#   recipe, seeds 789 790 791 (SEEDS), each with EXTRA flags.
#   run (device tool), carry [".data"] (MNIST's four .gz files under .data/mnist):
#       bash tools/device_runs.sh
#       JOBS=$'leaky-s789 --leaky-relu -s 789\nleaky-s790 --leaky-relu -s 790' bash tools/device_runs.sh
#   PARALLEL=P: a queue, at most P runs at once, the next started when one ends (while MIN_LEFT
#   seconds, default 120, remain before DEADLINE); EVALUATE=0 skips the re-evaluation from the saved
#   models, VIS=0 the pictures and the model copy (screening many short runs on validation):
#       PARALLEL=6 EVALUATE=0 VIS=0 BENCH=none JOBS=$'f-s1 --recipe fast -s 1\n...' bash tools/device_runs.sh
#   JOBS=none BENCH=$'-b 64\n-b 64 --compile-mode graphs' bash tools/device_runs.sh   # the bench alone
#   Runs longer than one call: GUARD=0 lets every run go on to DEADLINE (no early stops), and a second
#   call on the still-warm machine (issued at once: it is given back after ~30 s idle) continues them
#   from their last finished epoch with RESUME=1 and the same JOBS (the flags are the runs' own then):
#       GUARD=0 DEADLINE=520 EVALUATE=0 VIS=0 BENCH=none JOBS="$(cat tools/jobs/F)" bash tools/device_runs.sh
#       RESUME=1 JOBS="$(cat tools/jobs/F)" bash tools/device_runs.sh
#   Pace of 50-epoch default-recipe runs side by side (bf16, batch 64; 2026-11-26): on an H200, three
#   at ~10,000 img/s each, 5.1 min; on an H100, one alone ~9,000 img/s, two ~8,000 each (6.3 min),
#   three ~7,200 each (about 7 min: give DEADLINE 460 or more), four ~6,000 each (too slow for one call).
#   On an H200 on 2026-11-28 three at once ended 365-373 s into the call (--recon-weight 0.01); with
#   DEADLINE 395 the guard, then projecting from epoch 4's pace alone, stopped one of three (--erase 4)
#   that would have finished; it now waits for six epochs and takes the last three's pace. Give 430.
#   On an H200 on 2026-11-29 six at once (three layer, three --compile-mode graphs) ran 2,700-5,400
#   (layer) and 6,300-7,000 img/s (graphs) each: too slow for 50 epochs in one call.
#   dry run here:  OUT=/tmp/out DEVICE=cpu EXTRA="-e 1 --limit 640 --val 128" bash tools/device_runs.sh
set -u
T0=$SECONDS
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-470}      # seconds after start by which training must end (the call's limit is ~560)
EXTRA=${EXTRA:-}
OUT=${OUT:?OUT must name a folder}
RUNS=${RUNS:-/dev/shm/capsnet-runs}
if [ -z "${JOBS:-}" ]; then
  JOBS=$(for s in ${SEEDS:-789 790 791}; do echo "s$s --seed $s"; done)
elif [ "$JOBS" = none ]; then
  JOBS=""  # the bench alone
fi
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} CAPSNET_DATA=$RUNS/data
mkdir -p "$OUT" "$RUNS/data" && cp -r .data/mnist "$RUNS/data/"  # (the cache unpacks there, not in .data)
exec > >(tee "$OUT/device.log") 2>&1
elapsed() { echo $((SECONDS - T0)); }

echo "capsnet commit ${COMMIT:-unknown}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
python3 -m capsnet --help >/dev/null || { echo "capsnet does not import"; exit 1; }

declare -A PID FLAGS
NAMES=()   # every job, in order
PENDING=() # jobs not started yet (PARALLEL: at most that many run at once)
while read -r name flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue  # (blank lines and comments)
  NAMES+=("$name"); PENDING+=("$name"); FLAGS[$name]="$flags $EXTRA"
done <<< "$JOBS"
PARALLEL=${PARALLEL:-${#NAMES[@]}}
MIN_LEFT=${MIN_LEFT:-120}  # queue: a job is started only while this many seconds are left before DEADLINE
start_job() {
  if [ "${RESUME:-0}" = 1 ]; then  # continue $RUNS/NAME where its last finished epoch left it
    # shellcheck disable=SC2086
    python3 -m capsnet train --device "$DEVICE" --resume "$RUNS/$1" $EXTRA >> "$RUNS/train-$1.log" 2>&1 &
    PID[$1]=$!
    echo "[$(elapsed) s] resumed $1 after $(epochs_done "$1") epochs"
    return
  fi
  # shellcheck disable=SC2086
  python3 -m capsnet train --device "$DEVICE" --save "$RUNS/$1" --force ${FLAGS[$1]} > "$RUNS/train-$1.log" 2>&1 &
  PID[$1]=$!
  echo "[$(elapsed) s] started $1: capsnet train ${FLAGS[$1]}"
}
epochs_done() { [ -f "$RUNS/$1/metrics.jsonl" ] && wc -l < "$RUNS/$1/metrics.jsonl" || echo 0; }
running() { local k=0 n; for n in "${!PID[@]}"; do kill -0 "${PID[$n]}" 2>/dev/null && k=$((k + 1)); done; echo $k; }
start_pending() {
  while (( ${#PENDING[@]} > 0 && $(running) < PARALLEL )); do
    if (( $(elapsed) > DEADLINE - MIN_LEFT )); then echo "[$(elapsed) s] too late to start: ${PENDING[*]}"; PENDING=(); break; fi
    start_job "${PENDING[0]}"; PENDING=("${PENDING[@]:1}")
  done
}
start_pending

total_epochs() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['train']['epochs'])" "$RUNS/$1/config.json" 2>/dev/null || echo 0; }
last_report=0; last_kill=-1000
while :; do
  alive=()
  start_pending
  for n in "${NAMES[@]}"; do [ -n "${PID[$n]:-}" ] && kill -0 "${PID[$n]}" 2>/dev/null && alive+=("$n"); done
  [ ${#alive[@]} -eq 0 ] && [ ${#PENDING[@]} -eq 0 ] && break
  now=$(elapsed)
  if (( now > DEADLINE )); then echo "[$now s] deadline: stopping ${alive[*]}"; for n in "${alive[@]}"; do kill "${PID[$n]}"; done; PENDING=(); break; fi
  if (( now - last_report >= 30 )); then
    last_report=$now
    line="[$now s]"; for n in "${NAMES[@]}"; do line="$line $n: $(epochs_done "$n")/$(total_epochs "$n")"; done; echo "$line"
    # If the first run still going will miss the deadline at its pace over its last three epochs
    # (judged once it has six: the first epochs of runs sharing a card ran up to a third slower
    # than the rest on 2026-11-28), stop the run still going that is furthest from done: the fewest
    # epochs finished, the later in JOBS on a tie (the others speed up). Until 2026-11-30 it stopped
    # the last in JOBS order, which on 2026-11-29 was a run at 38 of 50 epochs.
    [ ${#alive[@]} -eq 0 ] && { sleep 2; continue; }
    lead=${alive[0]}
    left=$(python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(round((int(sys.argv[2])-r[-1]['epoch'])*(r[-1]['elapsed']-r[-4]['elapsed'])/3) if len(r)>=6 else -1)" "$RUNS/$lead/metrics.jsonl" "$(total_epochs "$lead")" 2>/dev/null || echo -1)
    if (( ${GUARD:-1} == 1 && ${#PENDING[@]} == 0 && ${#alive[@]} > 1 && left >= 0 && now - last_kill > 60 && now + left > DEADLINE )); then
      victim=${alive[0]}
      for n in "${alive[@]}"; do (( $(epochs_done "$n") <= $(epochs_done "$victim") )) && victim=$n; done
      last_kill=$now
      echo "[$now s] $lead projected to end at $((now + left))s > ${DEADLINE}s: stopping $victim after $(epochs_done "$victim") epochs"; kill "${PID[$victim]}"
    fi
  fi
  sleep 2
done
# shellcheck disable=SC2086
[ -n "${PID[*]:-}" ] && wait ${PID[*]} 2>/dev/null  # (a bare wait would also wait for the tee above)
echo "[$(elapsed) s] training over"

EVAL=()
for n in "${NAMES[@]}"; do
  [ -f "$RUNS/train-$n.log" ] && tail -n 4 "$RUNS/train-$n.log" | sed "s/^/$n| /"
  if [ "${EVALUATE:-1}" = 1 ] && [ -f "$RUNS/$n/summary.json" ]; then
    ( for m in model.pt final.pt; do [ -f "$RUNS/$n/$m" ] && echo "$m: $(python3 -m capsnet evaluate --device "$DEVICE" --load "$RUNS/$n/$m" 2>&1 | tail -n 1)"; done ) > "$RUNS/evaluate-$n.log" &
    EVAL+=($!)
  fi
done
[ ${#EVAL[@]} -gt 0 ] && wait "${EVAL[@]}"
for n in "${NAMES[@]}"; do [ -f "$RUNS/evaluate-$n.log" ] && sed "s/^/$n evaluate| /" "$RUNS/evaluate-$n.log"; done

first=${NAMES[0]:-}
if [ "${VIS:-1}" = 1 ] && [ -n "$first" ] && [ -f "$RUNS/$first/model.pt" ]; then
  python3 -m capsnet visualize --device "$DEVICE" --load "$RUNS/$first" --out "$RUNS/vis" > "$RUNS/visualize.log" 2>&1 || tail -n 3 "$RUNS/visualize.log"
  tar czf "$OUT/vis.tgz" -C "$RUNS" vis visualize.log 2>/dev/null
  split -b 15M -d "$RUNS/$first/model.pt" "$OUT/model-$first.pt.part"
  sha256sum "$RUNS/$first/model.pt"
fi
tar czf "$OUT/runs.tgz" -C "$RUNS" --exclude='*.pt' --exclude=vis --exclude=./data .  # (data: 64 MB, over the limit)

# BENCH: one `capsnet bench` per line (its flags), run after the training if time is left;
# BENCH=none skips it. Each line gets its own process and at most BENCH_LIMIT seconds.
BENCH=${BENCH:-$'-b 128\n-b 512'}
if [ "$BENCH" != none ] && (( $(elapsed) < DEADLINE + 15 )); then
  while read -r flags; do
    [ -z "$flags" ] && continue
    # shellcheck disable=SC2086
    timeout "${BENCH_LIMIT:-90}" python3 -m capsnet bench --device "$DEVICE" --steps 30 --json $flags >> "$OUT/bench-$DEVICE.jsonl" 2>>"$OUT/device.log" \
      || echo "bench $flags: failed or timed out"
  done <<< "$BENCH"
  cat "$OUT/bench-$DEVICE.jsonl" 2>/dev/null
fi
echo "[$(elapsed) s] done"
for n in "${NAMES[@]}"; do
  [ -f "$RUNS/$n/summary.json" ] && echo "$n $(tr -d '\n ' < "$RUNS/$n/summary.json")" || echo "$n unfinished ($(epochs_done "$n") epochs)"
done
