#!/usr/bin/env bash
# Device check for issue 4: the default recipe, three seeds at once on one GPU, then each run
# evaluated again from its model.pt, pictures of the first seed, and the GPU benchmark if time is left.
# Everything small comes back through $OUT (runs.tgz, vis.tgz, the first seed's model.pt in parts).
#
#   run (device tool), carry [".data"]:  bash tools/device_seeds.sh
#   dry run here:  OUT=/tmp/out DEVICE=cpu EXTRA="-e 1 --limit 640 --val 128" bash tools/device_seeds.sh
set -u
T0=$SECONDS
DEVICE=${DEVICE:-cuda}
SEEDS=${SEEDS:-"789 790 791"}
DEADLINE=${DEADLINE:-470}      # seconds after start by which training must end (the call's limit is ~560)
EXTRA=${EXTRA:-}
OUT=${OUT:?OUT must name a folder}
RUNS=${RUNS:-/dev/shm/capsnet-runs}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 CAPSNET_DATA=$PWD/.data
mkdir -p "$OUT" "$RUNS"
exec > >(tee "$OUT/device.log") 2>&1
elapsed() { echo $((SECONDS - T0)); }

echo "capsnet commit ${COMMIT:-unknown}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
python3 -m capsnet --help >/dev/null || { echo "capsnet does not import"; exit 1; }

declare -A PID
for s in $SEEDS; do
  python3 -m capsnet train --device "$DEVICE" --seed "$s" --save "$RUNS/s$s" --force $EXTRA > "$RUNS/train-s$s.log" 2>&1 &
  PID[$s]=$!
done

epochs_done() { [ -f "$RUNS/s$1/metrics.jsonl" ] && wc -l < "$RUNS/s$1/metrics.jsonl" || echo 0; }
total_epochs=$(python3 -c "import sys; sys.path.insert(0,'src'); from capsnet.config import TrainConfig; print(TrainConfig().epochs)")
case " $EXTRA " in *" -e "*) total_epochs=$(echo "$EXTRA" | sed -E 's/.*-e ([0-9]+).*/\1/');; esac
last_report=0; last_kill=-1000
while :; do
  alive=""
  for s in $SEEDS; do kill -0 "${PID[$s]}" 2>/dev/null && alive="$alive $s"; done
  [ -z "$alive" ] && break
  now=$(elapsed)
  if (( now > DEADLINE )); then echo "[$now s] deadline: stopping$alive"; for s in $alive; do kill "${PID[$s]}"; done; break; fi
  if (( now - last_report >= 30 )); then
    last_report=$now
    line="[$now s]"; for s in $SEEDS; do line="$line s$s: $(epochs_done $s)/$total_epochs"; done; echo "$line"
    # If the first seed still running will miss the deadline at its last epoch's pace (the
    # 'elapsed' difference of its last two records), stop the last seed (the others speed up).
    n_alive=$(echo $alive | wc -w); lead=$(echo $alive | awk '{print $1}')
    left=$(python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])][-2:]; print(round((int(sys.argv[2])-r[1]['epoch'])*(r[1]['elapsed']-r[0]['elapsed'])) if len(r)==2 else -1)" "$RUNS/s$lead/metrics.jsonl" "$total_epochs" 2>/dev/null || echo -1)
    if (( n_alive > 1 && left >= 0 && now - last_kill > 60 )); then
      eta=$(( now + left ))
      if (( eta > DEADLINE )); then victim=$(echo $alive | awk '{print $NF}'); last_kill=$now
        echo "[$now s] s$lead projected to end at ${eta}s > ${DEADLINE}s at its last epoch's pace: stopping s$victim"; kill "${PID[$victim]}"; fi
    fi
  fi
  sleep 2
done
wait "${PID[@]}" 2>/dev/null  # (a bare wait would also wait for the tee above)
echo "[$(elapsed) s] training over"

for s in $SEEDS; do
  tail -n 3 "$RUNS/train-s$s.log" | sed "s/^/s$s| /"
  if [ -f "$RUNS/s$s/summary.json" ]; then
    python3 -m capsnet evaluate --device "$DEVICE" --load "$RUNS/s$s" > "$RUNS/evaluate-s$s.log" 2>&1 & EVAL="${EVAL:-} $!"
  fi
done
[ -n "${EVAL:-}" ] && wait $EVAL
for s in $SEEDS; do [ -f "$RUNS/evaluate-s$s.log" ] && sed "s/^/s$s evaluate| /" "$RUNS/evaluate-s$s.log"; done

first=$(echo $SEEDS | awk '{print $1}')
if [ -f "$RUNS/s$first/model.pt" ]; then
  python3 -m capsnet visualize --device "$DEVICE" --load "$RUNS/s$first" --out "$RUNS/vis" > "$RUNS/visualize.log" 2>&1 || tail -n 3 "$RUNS/visualize.log"
  tar czf "$OUT/vis.tgz" -C "$RUNS" vis visualize.log 2>/dev/null
  split -b 15M -d "$RUNS/s$first/model.pt" "$OUT/model-s$first.pt.part"
  sha256sum "$RUNS/s$first/model.pt"
fi
tar czf "$OUT/runs.tgz" -C "$RUNS" --exclude='*.pt' --exclude=vis .

if [ "${BENCH:-1}" = 1 ] && [ "$DEVICE" = cuda ] && (( $(elapsed) < DEADLINE + 15 )); then
  for b in 128 512; do
    timeout 40 python3 -m capsnet bench --device cuda -b $b --steps 30 --json >> "$OUT/bench-cuda.jsonl" 2>>"$OUT/device.log"
  done
  cat "$OUT/bench-cuda.jsonl" 2>/dev/null
fi
echo "[$(elapsed) s] done"
for s in $SEEDS; do
  [ -f "$RUNS/s$s/summary.json" ] && echo "s$s $(cat "$RUNS/s$s/summary.json" | tr -d '\n ')" || echo "s$s unfinished ($(epochs_done $s) epochs)"
done
