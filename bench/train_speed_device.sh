#!/usr/bin/env bash
# The trainer's speed on the device machine without the rest of the pipeline: a few calls of one
# warm machine (it keeps /tmp for 30 s after a call), each carrying what `bash
# bench/device_prep.sh train` made here:
#   1. carry .device/train/b1 and .device/trainkit:   bash bench/train_speed_device.sh stage
#   2. carry .device/train/b2:                         bash bench/train_speed_device.sh explore
#      installs the wheels, builds the random 8B shape (/tmp/rand8b), runs the GPU-marked
#      training tests, then compares the trainer's choices in one process (bench/train.py
#      --variants): 8 x 512 micro-batches and seed-shaped ones (400 tokens, 8 or 16 a step),
#      30 steps each. The fastest seed shape under 8 GiB is written to /tmp/seed_choice.
#   3. bash bench/train_speed_device.sh seed N:  N seed-workload runs (each its own process) with
#      that choice; bench/train.py keeps their median as seed_workload_s.
# Results accumulate in /tmp/train-results/train_device.json (started with the repo's figures of
# the fallback backend, which this does not rerun) and come back in $OUT after every call.
set -euo pipefail
what=${1:?stage, explore or seed N}
res=/tmp/train-results
out=$res/train_device.json
if [ "$what" = stage ]; then
  mkdir -p /tmp/dev/train
  cp -r .device/train/b1/. /tmp/dev/train/
  cp -r .device/trainkit /tmp/dev/
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  exit 0
fi
export PYTHONPATH=/tmp/site-train:/tmp/site-kit:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$res"
if [ ! -f "$out" ]; then  # figures of this machine's runs only, and the fallback's (not rerun)
  python3 - bench/results/train_device.json "$out" <<'PY'
import json, sys
old = json.load(open(sys.argv[1]))
keep = ("model", "hf_speed", "hf_tok_s", "hf_peak_gib")
json.dump({k: old[k] for k in keep if k in old}, open(sys.argv[2], "w"), indent=2)
PY
fi
keep() { [ -n "${OUT:-}" ] && cp "$out" "$OUT/" || true; }
trap keep EXIT
if [ "$what" = explore ]; then
  t0=$(date +%s)
  cp -r .device/train/b2/. /tmp/dev/train/
  bash /tmp/dev/trainkit/install.sh /tmp/dev/train /tmp/site-train
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-kit /tmp/dev/trainkit/whl/*.whl
  # The random-weight 8B shape, built on the GPU while the tests run on it.
  if [ ! -f /tmp/rand8b/config.json ]; then
    python3 -c "import sys; from pathlib import Path; from engine.models import write_random_model
write_random_model('llama-3.1-8b', Path('/tmp/rand8b'), tokenizer_from=Path(sys.argv[1]), device='cuda')" \
      /tmp/dev/trainkit/tok > /tmp/rand8b.log 2>&1 &
    build=$!
  fi
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/trainer/test_gpu_training.py 2>&1 | tail -5
  [ -z "${build:-}" ] || wait "$build" || { tail -5 /tmp/rand8b.log; exit 1; }
  echo "installed, tested and built in $(( $(date +%s) - t0 )) s"
  # Unsloth patches torch's checkpointing for its offloading mode process-wide: the variants
  # that keep checkpoints on the device run in one process, the offloading ones in another.
  device='[
    {"label": "_answers_device", "checkpointing": "device", "speed_steps": 30},
    {"label": "_whole_device", "checkpointing": "device", "whole_loss": true, "speed_steps": 30},
    {"label": "_answers_device_8bit", "checkpointing": "device", "optimizer": "adamw_8bit",
     "speed_steps": 30},
    {"label": "_seedshape_b8_device", "checkpointing": "device", "speed_tokens": 400,
     "speed_steps": 30},
    {"label": "_seedshape_b16_device", "checkpointing": "device", "speed_batch": 16,
     "speed_tokens": 400, "speed_steps": 24},
    {"label": "_answers_device_profile", "checkpointing": "device", "speed_steps": 12,
     "profile": true}
  ]'
  offload='[
    {"label": "_answers_offload", "checkpointing": "offload", "speed_steps": 30},
    {"label": "_seedshape_b8_offload", "checkpointing": "offload", "speed_tokens": 400,
     "speed_steps": 30},
    {"label": "_seedshape_b16_offload", "checkpointing": "offload", "speed_batch": 16,
     "speed_tokens": 400, "speed_steps": 24}
  ]'
  for variants in "$device" "$offload"; do
    timeout $(( 570 - ($(date +%s) - t0) )) python3 bench/train.py --out "$out" \
      --model-dir /tmp/rand8b --phases speed --variants "$variants" | grep -v '^step' \
      || echo "variants stopped (time limit or failure)"
  done
  python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for k, v in r.items():
    if k.startswith("speed_") and isinstance(v, dict) and "steady_step_s_median" in v:
        b, t = v["variant"]["speed_batch"], v["variant"]["speed_tokens"]
        print(f"{k:28} {v['tok_s']:8.0f} tok/s  peak {v['peak_gib']:.2f} GiB  step "
              f"{v['steady_step_s_median']:.3f} s  load {v['load_s']:.1f} s  first "
              f"{v['first_steps_s'][:2]}  before {v['allocated_before_gib']} GiB "
              f"{v['trainable_dtypes']}")
# The headline 8 x 512 figure: the faster answers-only variant under 8 GiB.
c = {k: r[k] for k in ("speed_answers_device", "speed_answers_offload")
     if k in r and "error" not in r[k] and r[k]["peak_gib"] <= 8.0}
if c:
    best = max(c.values(), key=lambda v: v["tok_s"])
    r["speed"] = best
    r["train_tok_s_8x512"] = r["tok_s"] = best["tok_s"]
    r["peak_gib"] = best["peak_gib"]
# The seed's shape: seconds per token of a steady step, under 8 GiB (a 16-example step only
# where it is faster per token).
s = {k: v for k, v in r.items() if k.startswith("speed_seedshape_") and isinstance(v, dict)
     and "error" not in v and v["peak_gib"] <= 8.0}
if s:
    k = min(s, key=lambda k: s[k]["steady_step_s_median"] / s[k]["variant"]["speed_batch"])
    v = s[k]["variant"]
    open("/tmp/seed_choice", "w").write(
        f"--checkpointing {v['checkpointing']} --seed-batch {v['speed_batch']}")
    print("seed choice:", k)
json.dump(r, open(sys.argv[1], "w"), indent=2)
PY
  echo "explore done in $(( $(date +%s) - t0 )) s"
elif [ "$what" = seed ]; then
  n=${2:-1}
  choice=$(cat /tmp/seed_choice 2>/dev/null || echo "--checkpointing device --seed-batch 8")
  echo "seed runs: $n x ($choice)"
  for _ in $(seq "$n"); do
    # shellcheck disable=SC2086
    python3 bench/train.py --out "$out" --model-dir /tmp/rand8b --phases seed $choice \
      | grep -E '^(step|event|seed|\{"train)' | grep -vE '^step [0-9]*[1-9]/' || true
  done
fi
