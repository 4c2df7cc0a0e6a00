#!/usr/bin/env bash
# The GPU work in lanes: shared set-up once (smoke, model, data), then each lane's parts in order on its own GPU,
# lanes side by side. Lane i runs on GPU i mod <GPUs>; lanes sharing a GPU run one after the other, so no two
# measurements ever share a card. Every figure still comes from one process on one GPU; lanes only save wall time.
#
#   mkdir -p /tmp/site && tar xzf .gpu/site312.tgz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#   OUT=/tmp/gpu-out MW_GPU_BUDGET=540 bash benchmarks/gpu/run_lanes.sh "pipeline" "sft" "dpo tests" "gen"
#
# A lane's words with '=' are environment settings for that lane alone: "MW_GEN_BACKEND=hf gen".
# Results: $OUT/<lane>/ (run.log and the parts' JSON, as run_all.sh writes them) and $OUT/setup/. With
# MW_GPU_SNAPSHOT=<file>, a tar.gz of $OUT is rewritten every 15 s and at the end, so a command stopped at its time
# limit still returns everything written so far.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
BUDGET=${MW_GPU_BUDGET:-560}
export MW_GPU_DEADLINE=$(( $(date +%s) + BUDGET ))
mkdir -p "$OUT"
snapshot() { [[ -n ${MW_GPU_SNAPSHOT:-} ]] && tar czf "$MW_GPU_SNAPSHOT.part" -C "$OUT" . 2>/dev/null && mv "$MW_GPU_SNAPSHOT.part" "$MW_GPU_SNAPSHOT"; }
if [[ -n ${MW_GPU_SNAPSHOT:-} ]]; then
  ( while sleep 15; do snapshot; done ) &
  snapper=$!
fi

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
(( gpus > 0 )) || gpus=1
echo "lanes: $# on $gpus GPU(s), deadline in $BUDGET s"
OUT=$OUT/setup bash benchmarks/gpu/run_all.sh smoke model data

for (( g = 0; g < gpus; g++ )); do
  (
    i=0
    for lane in "$@"; do
      if (( i % gpus == g )); then
        settings=() parts=()
        for word in $lane; do [[ $word == *=* ]] && settings+=("$word") || parts+=("$word"); done
        name="lane$i-$(IFS=-; echo "${parts[*]}")"
        echo "GPU $g: $name ${settings[*]}"
        env "${settings[@]}" CUDA_VISIBLE_DEVICES=$g UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache_$i \
          OUT=$OUT/$name bash benchmarks/gpu/run_all.sh "${parts[@]}" >/dev/null 2>&1
        echo "GPU $g: $name exit $?"
      fi
      i=$(( i + 1 ))
    done
  ) &
done
wait $(jobs -p | grep -v "^${snapper:-x}$")
[[ -n ${snapper:-} ]] && kill "$snapper" 2>/dev/null
snapshot
for log in "$OUT"/lane*/run.log; do
  echo; echo "##### $log"; grep -E '^(=== |sft |dpo |sampling |eval |variant|hf |unsloth|env:|[0-9]+ passed|FAILED|ERROR|Traceback)' "$log" | tail -40
done
