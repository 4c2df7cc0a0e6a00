#!/usr/bin/env bash
# The one command for the GPU machine: the end-to-end Unsloth pipeline on the gemma-3n E2B-architecture model, then
# every GPU benchmark, each writing its figures to $OUT. Parts run in the order given (default: all of them).
#
#   mkdir -p /tmp/site && tar xzf .gpu/site312.tgz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#   OUT=/tmp/gpu-out bash benchmarks/gpu/run_all.sh [smoke] [model] [data] [sft] [pipeline] [dpo] [gen] [tests]
#
# On a machine with several GPUs, benchmarks/gpu/run_lanes.sh runs groups of parts side by side, one GPU each.
#
# Parts: smoke (imports, CLI help, nvidia-smi), model (build the random E2B model once), data (the sample's teach and
# pairs folders the benchmarks train on), sft / dpo / gen (the
# benchmarks), pipeline (`mathwizard run` with benchmarks/gpu/e2b-unsloth.yaml), tests (pytest -m gpu tests/gpu).
# MW_GPU_BUDGET (seconds, default 560) bounds the whole command: each part gets what is left, so a part that runs
# long is stopped and still leaves its progress in $OUT. Files in $OUT: run.log, sft.json, dpo.json,
# generation.json, pipeline.json, tests.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
WORK=${MW_GPU_WORK:-$PWD/.gpu/work}
BUDGET=${MW_GPU_BUDGET:-560}
DEADLINE=${MW_GPU_DEADLINE:-$(( $(date +%s) + BUDGET ))}  # run_lanes.sh hands every lane one shared deadline
mkdir -p "$OUT" "$WORK"
export MW_GPU_WORK=$WORK PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PREFECT_HOME=$WORK/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_UI_ENABLED=false
export UNSLOTH_DISABLE_STATISTICS=1
PY=${PYTHON:-python3}
MW=("$PY" -c "from mathwizard.cli import app; app()")
E2B=${MW_GPU_MODEL:-$WORK/e2b}  # MW_GPU_MODEL=tiny MW_GPU_BACKEND=hf: a CPU check of this script
DATA=$WORK/data
exec > >(tee -a "$OUT/run.log") 2>&1

left() { echo $(( DEADLINE - $(date +%s) )); }
banner() { echo; echo "=== $1 ($(date -u +%H:%M:%S), $(left) s left) ==="; }
bounded() {  # bounded SECONDS CMD...: run CMD, stopped when SECONDS (or the command's budget) run out
  local limit=$1; shift
  (( limit > $(left) - 5 )) && limit=$(( $(left) - 5 ))
  if (( limit < 30 )); then echo "skipped (no time left): $*"; return 124; fi
  timeout -k 10 "$limit" "$@"
  local rc=$?; (( rc == 124 )) && echo "stopped after $limit s: $*"
  return $rc
}

part_smoke() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" - <<'PY'
import importlib, time
failed = []
for name in ("torch", "transformers", "peft", "trl", "datasets", "pydantic", "pydantic_settings", "prefect", "openai",
             "tenacity", "matplotlib", "timm", "bitsandbytes", "flows.pipeline", "flows.sft", "flows.evaluate"):
    t = time.perf_counter()
    try:
        m = importlib.import_module(name)
    except Exception as exc:  # report every missing piece at once
        failed.append(name)
        print(f"import {name:<18} FAILED {type(exc).__name__}: {exc}")
        continue
    print(f"import {name:<18} {getattr(m, '__version__', ''):<12} {time.perf_counter() - t:5.1f} s")
import torch
if torch.cuda.is_available():
    print("cuda", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
else:
    print("no CUDA device")
raise SystemExit(1 if failed else 0)
PY
  local rc=$?
  "${MW[@]}" --help >/dev/null && echo "mathwizard --help: ok" || rc=1
  return $rc
}

part_model() {
  if [[ $E2B == tiny || -f $E2B/mathwizard_model.json ]]; then echo "model already built: $E2B"; return 0; fi
  bounded 300 "${MW[@]}" model random-e2b --out "$E2B" --device cuda && du -sh "$E2B"
}

part_data() {
  "$PY" - "$DATA" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks/gpu")
from _common import ensure_pairs
data = Path(sys.argv[1])
ensure_pairs(data / "04-pairs", data / "02-teach")
print("data ready:", sorted(p.name for p in data.iterdir()))
PY
}

part_sft() {
  bounded "$(left)" "$PY" benchmarks/gpu/bench_sft.py --model "$E2B" --data "$DATA/02-teach" \
    --budget $(( $(left) - 20 )) --json "$OUT/sft.json" ${MW_SFT_ARGS:-}
}

part_dpo() {
  bounded "$(left)" "$PY" benchmarks/gpu/bench_dpo.py --model "$E2B" --data "$DATA/04-pairs" \
    --budget $(( $(left) - 20 )) --json "$OUT/dpo.json" ${MW_DPO_ARGS:-}
}

part_gen() {  # MW_GEN_BACKEND=hf|unsloth picks the backend (default: the script's) and names the JSON after it
  local backend=${MW_GEN_BACKEND:-}
  bounded "$(left)" "$PY" benchmarks/gpu/bench_generation.py --model "$E2B" --data "$DATA/02-teach" \
    --json "$OUT/generation${backend:+-$backend}.json" ${MW_GEN_ARGS:-} ${backend:+--backend "$backend"}
}

part_pipeline() {
  local home=$WORK/home
  rm -rf "$home/runs/e2b-unsloth"  # a fresh run each time: every stage really runs
  export MATHWIZARD_MODEL__NAME=$E2B
  [[ -n ${MW_GPU_BACKEND:-} ]] && export MATHWIZARD_MODEL__BACKEND=$MW_GPU_BACKEND MATHWIZARD_MODEL__DTYPE=auto
  bounded "$(left)" "${MW[@]}" run --config benchmarks/gpu/e2b-unsloth.yaml --home "$home"
  local rc=$?
  "$PY" benchmarks/gpu/pipeline_summary.py "$home/runs/e2b-unsloth" --json "$OUT/pipeline.json" || true
  return $rc
}

part_tests() {
  bounded "$(left)" "$PY" -m pytest -m gpu -p no:cacheprovider -q tests/gpu 2>&1 | tee "$OUT/tests.log"
}

parts=("$@")
(( ${#parts[@]} )) || parts=(smoke model data sft pipeline dpo gen tests)
status=0
for part in "${parts[@]}"; do
  banner "$part"
  started=$(date +%s)
  "part_$part"; rc=$?
  echo "=== $part: exit $rc after $(( $(date +%s) - started )) s"
  (( rc != 0 )) && status=1
done
banner "done"
exit $status
