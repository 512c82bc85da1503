#!/usr/bin/env bash
# The trainer's speed on the device machine without the rest of the pipeline: a few calls of one
# warm machine (it keeps /tmp for 30 s after a call), each carrying what `bash
# bench/device_prep.sh train` made here:
#   1. carry .device/train/b1 and .device/trainkit:   bash bench/train_speed_device.sh stage
#   2. carry .device/train/b2:                         bash bench/train_speed_device.sh speed N
#      installs the wheels, builds the random 8B shape (/tmp/rand8b), runs the GPU-marked
#      training tests, then N runs of 8 x 512 micro-batches, each its own process, with the
#      per-layer compile on (what a long job gets): train_tok_s_8x512 is their median.
#      Or `ab N LABEL FLAGS...` instead: the same N runs, each followed (but the last) by one
#      with bench/train.py's FLAGS, kept as speedLABELi: e.g. `ab 3 _attn_flash --attention
#      flash` (torch's flash attention kernel instead of cuDNN's), `ab 3 _keep3 --keep-layers 3`
#      (three layers keep their activations instead of recomputing them) or `ab 3 _target8
#      --memory-target 8` (as many layers as fit under 8 GiB after the first step do).
#      Or `compile` instead: the same preparation, then Unsloth's per-layer torch.compile
#      against none (the first step and a seed-shaped step, two fresh processes).
#      Or `trace` instead: the same preparation, then two profiled steps of a seed-shaped batch
#      (16 x 400) whose Chrome trace comes back with bench/trace_gaps.py's account of where the
#      GPU sat idle, and 8 x 512 with the input embeddings on the host and on the GPU (two fresh
#      processes, compile off: speed_embhost, speed_embdevice).
#   3. bash bench/train_speed_device.sh seed N [B]:  N seed-workload runs (each its own process)
#      at the trainer's defaults, B examples a step (24 unless given: its longest micro-batch,
#      24 x 500 tokens, peaks at 7.82 GiB, under the 8 GiB bar); bench/train.py keeps their
#      median as seed_workload_s. Another B is kept under seed_bB (seed_bB_runs_s).
# Results accumulate in /tmp/train-results/train_device.json (started with the repo's figures of
# the fallback backend, which this does not rerun) and come back in $OUT after every call.
set -euo pipefail
what=${1:?stage, speed N, ab N LABEL FLAGS..., compile, trace or seed N [B]}
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
keep() { [ -n "${OUT:-}" ] && cp "$out" "$res"/trace-*.json.gz "$OUT/" 2>/dev/null || true; }
trap keep EXIT
t0=$(date +%s)
if [[ $what =~ ^(speed|ab|compile|trace)$ ]]; then
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
fi
left() { echo $(( 570 - ($(date +%s) - t0) )); }
if [ "$what" = speed ] || [ "$what" = ab ]; then
  # The first run also pays the process-independent cold start (Triton and inductor caches).
  n=${2:-3}
  [ "$what" = speed ] || { label=${3:?ab N LABEL FLAGS...}; flags=("${@:4}"); }
  for i in $(seq "$n"); do
    timeout "$(left)" python3 bench/train.py --out "$out" --model-dir /tmp/rand8b \
      --phases speed --speed-steps 30 --compile-layers on \
      | grep -E '^(\{"phase|speed|\{"train)' || echo "stopped (time limit or failure)"
    [ "$what" = ab ] && [ "$i" -lt "$n" ] || continue
    timeout "$(left)" python3 bench/train.py --out "$out" --model-dir /tmp/rand8b \
      --phases speed --speed-steps 30 --compile-layers on "${flags[@]}" --label "$label$i" \
      | grep -E '^(\{"phase|speed)' || echo "stopped (time limit or failure)"
  done
elif [ "$what" = compile ]; then
  # Without first, so that the uncompiled process does not find the compiled one's caches.
  for c in off on; do
    timeout "$(left)" python3 bench/train.py --out "$out" \
      --model-dir /tmp/rand8b --phases speed --compile-layers $c --variants "[
      {\"label\": \"_cold_compile_$c\", \"speed_steps\": 8, \"profile_first\": true},
      {\"label\": \"_seedshape_b16_compile_$c\", \"speed_batch\": 16, \"speed_tokens\": 400,
       \"speed_steps\": 24}]" \
      | grep -E '^(\{"phase|event|speed)' || echo "stopped (time limit or failure)"
  done
elif [ "$what" = trace ]; then
  timeout "$(left)" python3 bench/train.py --out "$out" --model-dir /tmp/rand8b \
    --phases speed --speed-batch 16 --speed-tokens 400 --speed-steps 24 --profile \
    --trace "$res" --label _trace_16x400 \
    | grep -E '^(window|idle|host calls|\{"phase)|^ +[0-9.]+ ms |^  stream' || echo "trace stopped"
  for e in host device; do
    timeout "$(left)" python3 bench/train.py --out "$out" --model-dir /tmp/rand8b \
      --phases speed --speed-steps 30 --compile-layers off --input-embeddings $e \
      --label "_emb$e" | grep -E '^\{"phase' || echo "stopped (time limit or failure)"
  done
elif [ "$what" = seed ]; then
  batch=${3:-24}
  label=(); [ "$batch" = 24 ] || label=(--label "_b$batch")
  for _ in $(seq "${2:-1}"); do
    timeout "$(left)" python3 bench/train.py --out "$out" --model-dir /tmp/rand8b --phases seed \
      --seed-batch "$batch" "${label[@]}" \
      | grep -E '^(step|event|seed|\{"train)' | grep -vE '^step [0-9]*[1-9]/' || true
    keep  # the figures so far, should the call be cut short
  done
fi
echo "$what done in $(( $(date +%s) - t0 )) s"
