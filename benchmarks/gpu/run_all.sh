#!/usr/bin/env bash
# Everything the GPU machine checks and measures, in parts; each part also runs alone. Results go to $OUT.
#
#   OUT=out/gpu bash benchmarks/gpu/run_all.sh [smoke] [model] [data] [gen] [sft] [dpo] [pipeline] [tests] [projection]
#
# Parts: smoke (imports, CLI help, the card), model (the random E2B-architecture model, built once on the GPU), data
# (the sample's prepare/teach/pairs folders, made by the stages), gen / sft / dpo (the benchmarks, each printing its
# ratio to a baseline measured in the same command), pipeline (`mathwizard run` with benchmarks/gpu/e2b-unsloth.yaml),
# tests (pytest -m gpu tests/gpu, Unsloth imported first), projection (the real recipe's wall time from the JSON the
# benchmarks wrote). Default: all of them. Extra arguments: MW_SFT_ARGS, MW_DPO_ARGS, MW_GEN_ARGS; MW_TEST_K
# selects tests (pytest -k), e.g. MW_TEST_K="not compiled_decoding".
# Files in $OUT: run.log, generation.json, sft.json, dpo.json, pipeline.json, tests.log, projection.json.
# A machine without internet first needs the packages the lock names: benchmarks/gpu/pack.sh (docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
WORK=${MW_GPU_WORK:-$PWD/.gpu/work}
mkdir -p "$OUT" "$WORK"
export MW_GPU_WORK=$WORK PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PREFECT_HOME=$WORK/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_UI_ENABLED=false
export UNSLOTH_DISABLE_STATISTICS=1
PY=${PYTHON:-python3}
MW=("$PY" -c "from mathwizard.cli import app; app()")
E2B=${MW_GPU_MODEL:-$WORK/e2b}  # MW_GPU_MODEL=tiny: a CPU check of this script
DATA=$WORK/data
exec > >(tee -a "$OUT/run.log") 2>&1

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
raise SystemExit(1 if failed else 0)
PY
  local rc=$?
  "${MW[@]}" --help >/dev/null && echo "mathwizard --help: ok" || rc=1
  return $rc
}

part_model() {
  if [[ $E2B == tiny || -f $E2B/mathwizard_model.json ]]; then echo "model already built: $E2B"; return 0; fi
  "${MW[@]}" model random-e2b --out "$E2B" --device cuda && du -sh "$E2B"
}

part_data() {
  "$PY" -c "import sys; sys.path.insert(0, 'benchmarks/gpu'); from _common import ensure_data; print(ensure_data('$DATA'))"
}

part_gen() {
  "$PY" benchmarks/gpu/bench_generation.py --model "$E2B" --data "$DATA" --json "$OUT/generation.json" ${MW_GEN_ARGS:-}
}

part_sft() {
  "$PY" benchmarks/gpu/bench_sft.py --model "$E2B" --data "$DATA" --json "$OUT/sft.json" ${MW_SFT_ARGS:-}
}

part_dpo() {
  "$PY" benchmarks/gpu/bench_dpo.py --model "$E2B" --data "$DATA" --json "$OUT/dpo.json" ${MW_DPO_ARGS:-}
}

part_pipeline() {
  local home=$WORK/home
  rm -rf "$home/runs/e2b-unsloth"  # a fresh run each time: every stage really runs
  # -v: the stages' log lines too, among them each load's `model.kernels` and whether it found SFT's figures
  MATHWIZARD_MODEL__NAME=$E2B "${MW[@]}" -v run --config benchmarks/gpu/e2b-unsloth.yaml --home "$home"
  local rc=$?
  "$PY" benchmarks/gpu/pipeline_summary.py "$home/runs/e2b-unsloth" --json "$OUT/pipeline.json" || true
  return $rc
}

part_tests() {
  "$PY" -m pytest -p tests.gpu.unsloth_first -m gpu -p no:cacheprovider -q tests/gpu ${MW_TEST_K:+-k "$MW_TEST_K"} \
    2>&1 | tee "$OUT/tests.log"
}

part_projection() {
  "$PY" benchmarks/gpu/projection.py --dir "$OUT" --json "$OUT/projection.json"
}

parts=("$@")
(( ${#parts[@]} )) || parts=(smoke model data gen sft dpo pipeline tests projection)
status=0
for part in "${parts[@]}"; do
  echo; echo "=== $part ($(date -u +%H:%M:%S))"
  started=$(date +%s)
  "part_$part"; rc=$?
  echo "=== $part: exit $rc after $(( $(date +%s) - started )) s"
  (( rc != 0 )) && status=1
done
exit $status
