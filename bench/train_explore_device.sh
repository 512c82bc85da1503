#!/usr/bin/env bash
# On the device machine, after `bash bench/pipeline_device.sh quality` in the same warm machine
# (it installed the wheel sets and builds /tmp/rand8b): the trainer's training choices compared on
# the random 8B shape in one call, then the seed workload with the faster one.
#   1. 8 x 512 micro-batches, 30 steps each: the model's own loss over every position vs the output
#      layer at the answer tokens only (offloaded checkpoints), and answers-only with the
#      checkpoints kept on the GPU (both profiled over two late steps);
#   2. the faster checkpointing is written to /tmp/ckpt_choice (the speed pipeline phase reads it)
#      and its figures become train_tok_s_8x512 / peak_gib;
#   3. the seed workload with it (then, time allowing, once more at 16 examples a step).
# Results: $OUT/train_device.json (and /tmp/pipe-results/train_device.json).
set -euo pipefail
t0=$(date +%s)
if [ -f /tmp/rand8b.pid ]; then
  for _ in $(seq 900); do kill -0 "$(cat /tmp/rand8b.pid)" 2>/dev/null || break; sleep 0.5; done
fi
[ -f /tmp/rand8b/config.json ] || { tail -5 /tmp/rand8b.log; exit 1; }
echo "rand8b ready after $(( $(date +%s) - t0 )) s"
export PYTHONPATH=/tmp/site-train:/tmp/site-gw:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
res=/tmp/pipe-results
mkdir -p "$res"
out=$res/train_device.json
[ -f "$out" ] || cp bench/results/train_device.json "$out"
run() { python3 bench/train.py --out "$out" --model-dir /tmp/rand8b "$@" | grep -v '^{' || true; }
budget=560
left() { echo $(( budget - ($(date +%s) - t0) )); }
timeout "$(left)" bash -c "$(declare -f run); out=$out
  run --phases speed --speed-steps 30 --whole-loss --label _whole_offload
  run --phases speed --speed-steps 30 --profile --label _answers_offload
  run --phases speed --speed-steps 30 --profile --checkpointing device --label _answers_device" \
  || echo "variants stopped at the time limit"
python3 - "$out" <<'PY'
import json, sys
p = sys.argv[1]
r = json.load(open(p))
cands = {"offload": r.get("speed_answers_offload"), "device": r.get("speed_answers_device")}
cands = {k: v for k, v in cands.items() if v and v.get("peak_gib", 99) <= 8.0}
best = max(cands, key=lambda k: cands[k]["tok_s"]) if cands else "offload"
for k in ("speed_whole_offload", "speed_answers_offload", "speed_answers_device"):
    if r.get(k):
        print(k, round(r[k]["tok_s"]), "tok/s", round(r[k]["peak_gib"], 2), "GiB",
              "load", r[k].get("load_s"), "first steps", r[k].get("first_steps_s"))
if cands:
    r["speed"] = cands[best]
    r["train_tok_s_8x512"] = r["tok_s"] = cands[best]["tok_s"]
    r["peak_gib"] = cands[best]["peak_gib"]
json.dump(r, open(p, "w"), indent=2)
open("/tmp/ckpt_choice", "w").write(best)
print("checkpointing:", best)
PY
ck=$(cat /tmp/ckpt_choice)
if (( $(left) > 250 )); then
  timeout "$(left)" bash -c "$(declare -f run); out=$out; run --phases seed --checkpointing $ck" \
    || echo "seed stopped at the time limit"
fi
if (( $(left) > 240 )); then
  timeout "$(left)" bash -c "$(declare -f run); out=$out
    run --phases seed --checkpointing $ck --seed-batch 16 --label _b16" \
    || echo "seed b16 stopped at the time limit"
fi
[ -n "${OUT:-}" ] && cp "$out" "$OUT/"
echo "done in $(( $(date +%s) - t0 )) s"
