#!/usr/bin/env bash
# The trainer's speed on the device machine without the rest of the pipeline: a few calls of one
# warm machine (it keeps /tmp for 30 s after a call), each carrying what `bash
# bench/device_prep.sh train` made here:
#   1. carry .device/train/b1 and .device/trainkit:   bash bench/train_speed_device.sh stage
#   2. carry .device/train/b2:                         bash bench/train_speed_device.sh explore
#      installs the wheels, builds the random 8B shape (/tmp/rand8b), runs the GPU-marked
#      training tests, then compares the trainer's choices in one process (bench/train.py
#      --variants): the answer-only output layer against the model's own loss (8 x 512 and 16
#      of 400 tokens a step), and where the input embeddings stay at the seed's longest batches
#      (16 of 500). The seed runs' choice is written to /tmp/seed_choice.
#   2'. or, carrying .device/train/b2:                  bash bench/train_speed_device.sh compile
#      the same preparation, then Unsloth's per-layer torch.compile against none (first step and
#      steady step, two fresh processes).
#   3. bash bench/train_speed_device.sh seed N:  N seed-workload runs (each its own process) with
#      that choice; bench/train.py keeps their median as seed_workload_s.
# Results accumulate in /tmp/train-results/train_device.json (started with the repo's figures of
# the fallback backend, which this does not rerun) and come back in $OUT after every call.
set -euo pipefail
what=${1:?stage, explore, compile or seed N}
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
if [ "$what" = explore ] || [ "$what" = compile ]; then
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
fi
if [ "$what" = compile ]; then
  # Unsloth's torch.compile region per decoder layer against none, each in a fresh process
  # whose first run is cold (host profiled) and whose second is seed-shaped (16 of 400): what
  # the compile costs at the first step and what it gives a step after. Without first, so that
  # the uncompiled process does not find the compiled one's caches.
  for bc in false true; do
    label=$([ $bc = true ] && echo _block || echo _noblock)
    timeout $(( 570 - ($(date +%s) - t0) )) python3 bench/train.py --out "$out" \
      --model-dir /tmp/rand8b --phases speed --variants "[
      {\"label\": \"_cold$label\", \"speed_steps\": 8, \"profile_first\": true,
       \"block_compile\": $bc, \"input_embeddings\": \"host\"},
      {\"label\": \"_seedshape_b16$label\", \"speed_batch\": 16, \"speed_tokens\": 400,
       \"speed_steps\": 24, \"block_compile\": $bc, \"input_embeddings\": \"host\"}]" \
      | grep -E '^(\{"phase|event|speed)' || echo "stopped (time limit or failure)"
  done
  echo "compile done in $(( $(date +%s) - t0 )) s"
elif [ "$what" = explore ]; then
  # One process, checkpoints offloaded (the default; on 2026-12-03 keeping them on the GPU was
  # slower and went over 8 GiB at 16 a step). A short first run takes the process's cold start
  # (its host profiled from the start of training to the first step's report), then the
  # answer-only output layer against the model's own loss at 8 x 512, in the order A B B A (on
  # 2026-12-03 a variant's place in its process moved its figure by up to 8%), and at the seed's
  # mean shape (16 of 400 tokens a step); then the seed's longest batches (16 of 500) with the
  # input embeddings on the GPU and on the host (the peak memory bar is 8 GiB); then Unsloth's
  # prefetch of offloaded checkpoints (UNSLOTH_GC_PREFETCH) at both shapes.
  variants='[
    {"label": "_warmup", "speed_steps": 8, "profile_first": true},
    {"label": "_answers_offload", "speed_steps": 24},
    {"label": "_whole_offload", "whole_loss": true, "speed_steps": 24},
    {"label": "_whole_offload2", "whole_loss": true, "speed_steps": 24},
    {"label": "_answers_offload2", "speed_steps": 24},
    {"label": "_seedshape_b16_whole", "whole_loss": true, "speed_batch": 16,
     "speed_tokens": 400, "speed_steps": 24},
    {"label": "_seedshape_b16_answers", "speed_batch": 16, "speed_tokens": 400,
     "speed_steps": 24},
    {"label": "_seed500_b16_device", "speed_batch": 16, "speed_tokens": 500, "speed_steps": 20},
    {"label": "_seed500_b16_host", "input_embeddings": "host", "speed_batch": 16,
     "speed_tokens": 500, "speed_steps": 20},
    {"label": "_seedshape_b16_answers_prefetch", "gc_prefetch": true, "speed_batch": 16,
     "speed_tokens": 400, "speed_steps": 24},
    {"label": "_answers_offload_prefetch", "gc_prefetch": true, "speed_steps": 24}
  ]'
  timeout $(( 570 - ($(date +%s) - t0) )) python3 bench/train.py --out "$out" \
    --model-dir /tmp/rand8b --phases speed --variants "$variants" | grep -v '^step' \
    || echo "variants stopped (time limit or failure)"
  python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ok = {k: v for k, v in r.items() if k.startswith("speed_") and isinstance(v, dict)
      and "steady_step_s_median" in v}
for k, v in ok.items():
    b, t = v["variant"]["speed_batch"], v["variant"]["speed_tokens"]
    print(f"{k:28} {v['tok_s']:8.0f} tok/s  peak {v['peak_gib']:.2f} GiB  step "
          f"{v['steady_step_s_median']:.3f} s  load {v['load_s']:.1f} s  first "
          f"{v['first_steps_s'][:2]}  before {v['allocated_before_gib']} GiB "
          f"{v['trainable_dtypes']}")
# The headline 8 x 512 figure: the runs of the trainer's default loss (the lower median).
from trainer.backends.gpu import Gpu4bitBackend
name = "answers" if Gpu4bitBackend.answer_logits_only else "whole"
runs = [ok[k] for k in (f"speed_{name}_offload", f"speed_{name}_offload2") if k in ok]
if runs:
    runs.sort(key=lambda v: v["tok_s"])
    r["speed"] = runs[(len(runs) - 1) // 2]
    r["train_tok_s_8x512_runs"] = [v["tok_s"] for v in runs]
    r["train_tok_s_8x512"] = r["tok_s"] = r["speed"]["tok_s"]
    r["peak_gib"] = r["speed"]["peak_gib"]
# The seed's runs: the faster loss at the seed's mean shape, and the input embeddings on the
# host where the longest batches on the GPU would pass 8 GiB.
pair = [ok.get(f"speed_seedshape_b16_{x}") for x in ("answers", "whole")]
if all(pair):
    whole = pair[1]["steady_step_s_median"] < pair[0]["steady_step_s_median"]
    longest = ok.get("speed_seed500_b16_device")
    host = longest is None or longest["peak_gib"] > 7.9
    pf = ok.get("speed_seedshape_b16_answers_prefetch")
    prefetch = pf is not None and pf["steady_step_s_median"] < pair[0]["steady_step_s_median"]
    choice = ("--checkpointing offload --seed-batch 16" + (" --whole-loss" if whole else "")
              + (" --input-embeddings host" if host else "")
              + (" --gc-prefetch" if prefetch else ""))
    open("/tmp/seed_choice", "w").write(choice)
    print("seed choice:", choice)
json.dump(r, open(sys.argv[1], "w"), indent=2)
PY
  echo "explore done in $(( $(date +%s) - t0 )) s"
elif [ "$what" = seed ]; then
  n=${2:-1}
  choice=$(cat /tmp/seed_choice 2>/dev/null || echo "--checkpointing offload --seed-batch 16")
  echo "seed runs: $n x ($choice)"
  for _ in $(seq "$n"); do
    # shellcheck disable=SC2086
    python3 bench/train.py --out "$out" --model-dir /tmp/rand8b --phases seed $choice \
      | grep -E '^(step|event|seed|\{"train)' | grep -vE '^step [0-9]*[1-9]/' || true
  done
fi
