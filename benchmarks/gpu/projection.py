"""The real recipe's GPU wall time on MM_Math-size data, projected from the rates the GPU benchmarks measured.

Usage: python benchmarks/gpu/projection.py --dir <folder with sft.json, dpo.json, generation.json> [--json out.json]
           [--layout one-process|per-stage] [--figures shared|own]

The recipe (deployments/recipes/gemma-3n-e2b.yaml) names the backend, micro-batch, accumulation and checkpointing of
SFT and DPO; the projection takes the measured variant with exactly those settings. MM_Math-size data: about 5,300
training items of about 650 tokens per SFT row (image soft tokens included).

Two layouts. `one-process` (default): `mathwizard run` and the Prefect pipeline, with `gpu_deployments` unset or
`orchestration.dispatch_gpu_stages: false`, run every stage in one Python process on one GPU, so the imports
(Unsloth's ~30 s) are paid once, by SFT, and with `vision_cache` the later stages find SFT's figures (the same frozen
tower: `mathwizard.models.kernels`).
`per-stage`: each GPU stage a process of its own (`gpu_deployments` on a `cuda` work pool): every stage pays its
imports and computes its own figures. Per GPU stage:
- sft: time to first step + max_steps x rows per step x 650 tokens / the variant's tokens/s; with `vision_cache`, the
  first epoch's tokens (every figure new) at the `:fresh` variant's rate, the rest at the plain variant's (every
  figure cached);
- pairs: start-up + one sampled answer per training item, every one the full max_new_tokens (a bound: real answers
  end sooner) at the engine's steady decode rate, plus each item's share of the measured call's time outside the
  decode steps (figure, prefill, capture), from the call with the figures known in one process;
- dpo: time to first step + max_steps x the variant's median step (sample pairs: chosen and rejected about as long
  as a real run's); with `vision_cache`, the plain variant in one process (SFT computed every figure), the `:fresh`
  one per stage (a real run's 800 pairs are each new);
- eval: per model (3), start-up + max_new_tokens decode steps of the measured median (all ~300 test items in one
  call; a bound: answers end sooner) + each item's share of the time outside the decode steps; in one process the
  base model's evaluation computes the test figures and the two after it find them.
Start-up in one process: SFT's time to first step, imports included; each later stage's load and build alone (DPO:
its time to first step less its process's imports; generation: the model's load). `--figures own` projects one
process whose later stages do not find SFT's figures (as if the loads' tower weights differed): a bound for when
that sharing is not in place.
Prepare and teach run on CPUs and a teacher API, so they are not part of the GPU time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# -----------------------------------------------------------------------------
train_items = 5_300  # MM_Math's training split (90 % of its ~5,900 items)
tokens_per_sft_row = 650
eval_items = 300  # the test split
eval_models = 3  # base, sft, dpo
recipe = REPO / "deployments" / "recipes" / "gemma-3n-e2b.yaml"
# -----------------------------------------------------------------------------


def variant_name(backend: str, cfg: Any) -> str:
    name = f"{backend}:{cfg.per_device_train_batch_size}x{cfg.gradient_accumulation_steps}"
    return name + (":gc" if cfg.gradient_checkpointing else "")


def project(
    sft: dict[str, Any],
    dpo: dict[str, Any],
    gen: dict[str, Any],
    settings: Any,
    layout: str = "one-process",
    figures: str = "shared",
) -> dict[str, Any]:
    """Seconds per GPU stage and in all, with what each figure came from."""
    backend = "unsloth" if settings.model.backend in ("auto", "unsloth") else "hf"
    cached = "vision_cache" in settings.model.kernels
    shared = cached and layout == "one-process" and figures == "shared"  # later stages find SFT's figures
    stages: dict[str, dict[str, Any]] = {}

    name = variant_name(backend, settings.sft)
    measured = _variant(sft, name, "sft")
    rows = settings.sft.per_device_train_batch_size * settings.sft.gradient_accumulation_steps
    tokens = settings.sft.max_steps * rows * tokens_per_sft_row
    run_s = tokens / measured["summary"]["tokens_per_s"]
    if cached:  # the first epoch's figures computed inside its steps, the later epochs' read
        first_epoch = min(tokens, train_items * tokens_per_sft_row)
        run_s -= first_epoch / measured["summary"]["tokens_per_s"]
        run_s += first_epoch / _variant(sft, f"{name}:fresh", "sft")["summary"]["tokens_per_s"]
        name += f" + {name}:fresh"
    stages["sft"] = {"variant": name, "start_s": measured["first_step_s"], "run_s": run_s, "tokens": tokens}

    def generation(kind: str, known: bool) -> dict[str, Any]:
        found = gen[kind].get("candidate_figures_known") if known else None
        return found or gen[kind]["candidate"]

    startup = gen["load_s"] if layout == "one-process" else gen.get("start_to_loaded_s", 0.0)
    sampling = generation("sampling", shared)
    tokens = train_items * settings.pairs.max_new_tokens
    decode_s = tokens / sampling["steady_tokens_per_s"]  # rows refilled: the decode steps never wait for a batch
    stages["pairs"] = {
        "figures": sampling.get("figures", "new"),
        "start_s": startup,
        "run_s": decode_s + train_items * _prefill_s(sampling),
        "tokens": tokens,
    }

    name = variant_name(backend, settings.dpo) + (":fresh" if cached and not shared else "")
    measured = _variant(dpo, name, "dpo")
    run_s = settings.dpo.max_steps * measured["summary"]["step_s"]["median"]
    start_s = measured["first_step_s"] - ((measured.get("import_s") or 0.0) if layout == "one-process" else 0.0)
    stages["dpo"] = {"variant": name, "start_s": start_s, "run_s": run_s}

    # One engine call per model: every test item in flight at once, max_new_tokens steps (a step costs about the
    # same with fewer rows: it is bound by its kernels, not by the rows), plus each item's prefill.
    run_s = 0.0
    for model in range(eval_models):
        evaluation = generation("eval", shared and model > 0)
        run_s += settings.eval.max_new_tokens * evaluation["step_ms"]["median"] / 1e3
        run_s += eval_items * _prefill_s(evaluation)
    stages["eval"] = {"start_s": eval_models * startup, "run_s": run_s}

    for stage in stages.values():
        stage["total_s"] = stage["start_s"] + stage["run_s"]
    return {"layout": layout, "stages": stages, "total_s": sum(s["total_s"] for s in stages.values())}


def _prefill_s(candidate: dict[str, Any]) -> float:
    """Seconds per request outside the decode steps (figure, prefill, graph capture), from the measured call."""
    decode_s = candidate["max_new_tokens"] * candidate["step_ms"]["median"] / 1e3
    return max(0.0, candidate["seconds"] - decode_s) / candidate["requests"]


def _variant(report: dict[str, Any], name: str, stage: str) -> dict[str, Any]:
    found = report.get("variants", {}).get(name)
    if not found or not found.get("summary", {}).get("tokens_per_s"):
        measured = ", ".join(report.get("variants", {})) or "none"
        raise SystemExit(f"the recipe's {stage} settings ({name}) were not measured (measured: {measured})")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="Folder holding sft.json, dpo.json, generation.json.")
    parser.add_argument("--recipe", type=Path, default=recipe)
    parser.add_argument(
        "--layout",
        default="one-process",
        choices=["one-process", "per-stage"],
        help="one-process: every stage in one process (dispatch_gpu_stages false); per-stage: one process a stage.",
    )
    parser.add_argument(
        "--figures",
        default="shared",
        choices=["shared", "own"],
        help="one-process: the later stages find SFT's figures (shared) or compute their own (a bound).",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from mathwizard.config import load_settings

    settings = load_settings(args.recipe)
    reports = {name: json.loads((args.dir / f"{name}.json").read_text()) for name in ("sft", "dpo", "generation")}
    result = project(reports["sft"], reports["dpo"], reports["generation"], settings, args.layout, args.figures)
    result["figures"] = args.figures
    result["recipe"] = str(args.recipe.relative_to(REPO)) if args.recipe.is_relative_to(REPO) else str(args.recipe)
    result["env"] = reports["sft"].get("env")
    for stage, s in result["stages"].items():
        what = f" ({s['variant']})" if "variant" in s else ""
        times = f"start {s['start_s']:6.0f} s + run {s['run_s']:7.0f} s = {s['total_s']:7.0f} s"
        print(f"projection {stage:<6}{what:<20} {times}")
    minutes = result["total_s"] / 60
    layout = args.layout + (", figures own" if args.figures == "own" and args.layout == "one-process" else "")
    print(f"projection ({layout}): the recipe's GPU stages on MM_Math-size data: {minutes:.1f} min of one GPU")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
