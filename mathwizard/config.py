"""Typed settings for every stage: defaults < YAML file (`--config`) < `.env` / environment (`MATHWIZARD_...`) < CLI.

The stage models are plain values (no secrets), so the same models serve as Prefect flow parameters and the
UI shows them as a form. Secrets live in `Secrets`, read at call time and never passed as parameters.
Defaults reproduce the original scripts' recipe (README, "sft, pairs, dpo, eval"); a default that differs says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from mathwizard.errors import ConfigError

# prepare's length limits in characters, far above MM_Math's questions and solutions (see PrepareConfig)
QUESTION_CHARS, SOLUTION_CHARS = 10_000, 20_000

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "val", "test")

# Output folder of each stage under a run folder, in pipeline order.
STAGE_DIRS: dict[str, str] = {
    "prepare": "01-prepare",
    "teach": "02-teach",
    "sft": "03-sft",
    "pairs": "04-pairs",
    "dpo": "05-dpo",
    "eval": "06-eval",
    "publish": "07-publish",
}


class _Stage(BaseModel):
    """Stage settings: a typo in a recipe fails instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- data
class PrepareConfig(_Stage):
    """Fetch MM_Math, clean every row and image, and split it stably."""

    source: Literal["sample", "hub", "local"] = Field("sample", description="Where MM_Math comes from.")
    hub_repo: str = Field("THU-KEG/MM_Math", description="Hub dataset id for source=hub.")
    hub_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for source=hub.")
    jsonl: str | None = Field(None, description="Path of the MM_Math jsonl/json file for source=local.")
    images: str | None = Field(None, description="Image folder or zip/tar archive for source=local.")
    max_image_size: int = Field(512, ge=16, le=8192, description="Longest image side in pixels after resizing.")
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="Images with more pixels than this are rejected (decompression bombs)."
    )
    max_question_chars: int = Field(
        QUESTION_CHARS,
        ge=1,
        description="Questions longer than this many characters are quarantined as too_long. MM_Math's run to a few"
        " hundred (the bundled sample's longest: 189); 10,000 (about 3,000 tokens) is already more than SFT's"
        " 2,048-token examples hold, so a longer one is not a problem statement but a broken row.",
    )
    max_solution_chars: int = Field(
        SOLUTION_CHARS,
        ge=1,
        description="Solutions longer than this many characters are quarantined as too_long. MM_Math's run to a few"
        " hundred (the bundled sample's longest: 255); the teacher writes each solution out again within"
        " teacher.max_tokens (2,048 tokens, about 7,000 characters), so one of 20,000 cannot be rewritten.",
    )
    splits: tuple[float, float, float] = Field(
        (0.90, 0.05, 0.05), description="Fractions for train, val and test; must sum to 1."
    )
    split_salt: str = Field(
        "mathwizard-split-v1", description="Mixed into each row's content hash; changing it reshuffles every row."
    )
    workers: int | None = Field(None, ge=1, description="Processes for image cleaning (default: all CPU cores).")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows (for trials).")

    @field_validator("splits", mode="before")
    @classmethod
    def _parse_splits(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = tuple(float(part) for part in value.split(","))
            except ValueError:
                raise ValueError(f"splits must be three numbers like 0.9,0.05,0.05, got {value!r}") from None
        return value

    @field_validator("splits")
    @classmethod
    def _check_splits(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(part < 0 for part in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"splits must be three non-negative fractions summing to 1, got {value}")
        return value


# ------------------------------------------------------------------------------------------- teacher
class TeacherConfig(_Stage):
    """Rewrite every solution into numbered steps and a final-answer block."""

    kind: Literal["auto", "rule", "openai"] = Field(
        "auto", description="auto: openai when an API key is configured, else the offline rule teacher."
    )
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (default: OpenAI's).")
    model: str = Field("gpt-4o-mini", description="Teacher model name at the endpoint (original: deepseek-chat).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature (original: 0).")
    max_tokens: int = Field(2048, ge=16, description="Most completion tokens per reply.")
    concurrency: int = Field(
        16,
        ge=1,
        le=1024,
        description="Most requests in flight at once; timeouts and 429s lower the limit (down to 1), successes raise"
        " it back.",
    )
    rpm: int | None = Field(500, ge=1, description="Requests per minute allowed by the API (None: no limit).")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute allowed by the API (None: no limit).")
    timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds one request may take on the wire (not counting its wait for a free slot) before it is"
        " abandoned, its connection closed, and retried.",
    )
    request_retries: int = Field(6, ge=0, description="Retries of one request on 429, 5xx, timeouts, bad bodies.")
    backoff_s: float = Field(0.5, gt=0, description="First retry delay in seconds (as the openai SDK); then doubled.")
    backoff_max_s: float = Field(60.0, gt=0, description="Longest retry delay in seconds (Retry-After may ask more).")
    max_attempts: int = Field(3, ge=1, description="Asks per item when replies fail validation.")
    max_failed_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Fraction of items that may fail before the stage fails."
    )
    retry_failed: bool = Field(
        False,
        description="Ask again the items whose failure is cached (invalid replies, refusals, too long); without it a"
        " re-run at temperature 0 serves them from the cache. Timeouts and 5xx are always asked again.",
    )
    split: Literal["train", "val", "test", "all"] = Field("all", description="Which split(s) to rewrite.")
    limit: int | None = Field(None, ge=1, description="Rewrite only the first N items of each split.")
    prompt_version: str = Field("v1", description="Prompt set under mathwizard/prompts/; its texts key the cache.")
    # Batch API (mode=batch): see mathwizard/teacher/batch.py
    mode: Literal["online", "batch"] = Field(
        "online",
        description="online: one chat completion per request, now; batch: the OpenAI-compatible Batch API (a JSONL"
        " file of requests, collected within 24 h, billed about half), for the items the cache lacks.",
    )
    batch_max_requests: int = Field(
        50_000, ge=1, description="Most requests in one batch file (OpenAI's limit: 50,000); more make more batches."
    )
    batch_max_bytes: int = Field(
        200_000_000,
        ge=1_000,
        description="Most bytes in one batch file (OpenAI's limit: 200 MB); more make more batches.",
    )
    batch_poll_s: float = Field(
        30.0, gt=0, description="Seconds before the first status check of a batch; then doubled."
    )
    batch_poll_max_s: float = Field(
        600.0, gt=0, description="Longest wait in seconds between status checks of a batch."
    )
    batch_wait_s: float | None = Field(
        600.0,
        gt=0,
        description="Seconds one stage attempt waits for running batches before it stops with BatchPending (re-run, or"
        " the Prefect task's next retry, resumes them from the journal); None: wait until every batch ends.",
    )
    batch_reask: Literal["batch", "online"] = Field(
        "batch",
        description="How items whose batch reply was invalid, or whose request failed or expired, are asked again:"
        " in a follow-up batch (cheaper) or online (sooner).",
    )
    price_input_per_mtok: float = Field(
        0.0, ge=0.0, description="Online price in USD per million prompt tokens, for report.json's cost (0: unknown)."
    )
    price_output_per_mtok: float = Field(
        0.0, ge=0.0, description="Online price in USD per million completion tokens, for the cost (0: unknown)."
    )
    batch_discount: float = Field(
        0.5, ge=0.0, le=1.0, description="Fraction taken off the online price for batch tokens (OpenAI's: 0.5)."
    )


# -------------------------------------------------------------------------------------------- models
class ModelConfig(_Stage):
    """The base model and how it is loaded."""

    name: str = Field(
        "tiny",
        description="Hub id (google/gemma-3n-E2B-it), local directory, or 'tiny' (a random gemma-3n built offline).",
    )
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="auto: Unsloth when CUDA and the gpu extra are present, else transformers+PEFT+TRL."
    )
    load_in_4bit: bool = Field(False, description="Load base weights in 4 bit (bitsandbytes; CUDA only).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU."
    )
    compile: Literal["eager", "modules", "unsloth", "layers"] = Field(
        "eager",
        description="What torch.compile covers. eager: nothing (UNSLOTH_COMPILE_DISABLE=1, no compile"
        " time); modules: Unsloth's compiled module forwards and loss, not whole decoder layers"
        " (UNSLOTH_BLOCK_COMPILE=0); unsloth: Unsloth's default, which also compiles each decoder layer as a region"
        " (see docs/gpu.md for its cost on gemma-3n); layers: Unsloth's compilation off as for eager, then SFT and"
        " DPO (both backends) torch.compile each decoder layer of the language model in place (Inductor fuses its"
        " elementwise kernels; the vision tower stays eager); its compile time counts in the first steps. The Unsloth"
        " switches are read when unsloth is first imported in a process.",
    )
    kernels: list[
        Literal["uniform_dtype", "rms_norm", "sdpa", "altup", "sparsity", "vision_attention", "vision_cache"]
    ] = Field(
        default_factory=lambda: [
            "uniform_dtype",
            "rms_norm",
            "sdpa",
            "altup",
            "sparsity",
            "vision_attention",
            "vision_cache",
        ],
        description="gemma-3n's eager pieces swapped for fused equivalents on the loaded model (the same function up"
        " to float rounding; mathwizard.models.kernels): uniform_dtype: a bf16 model's float32 weights (Unsloth's"
        " norms) cast to bf16, exactly, as the hf backend loads them, so the vision tower runs in bf16 and generation"
        " without autocast; rms_norm: torch's fused RMSNorm; sdpa: the language model's"
        " attention through scaled_dot_product_attention with the KV heads shared (Unsloth loads gemma-3n eager);"
        " altup: AltUp's per-token stream mix as one Triton pass on CUDA; sparsity: the first MLPs' activation"
        " cutoff without a host-to-device copy (a CPU-GPU sync) at every call (generation only: the decode step's CUDA"
        " graph needs it; training measured no gain); vision_attention: the vision tower's multi-query attention"
        " through a fused SDPA kernel (its query heads folded into the query length) instead of float32 math;"
        " vision_cache: SFT and DPO keep the"
        " frozen vision tower's output per figure (up to 8 GiB of GPU memory) instead of computing it again every"
        " epoch and for chosen, rejected and the reference. [] keeps the model's own code."
        " Not part of any fingerprint.",
    )
    decode: Literal["auto", "eager", "compiled", "graphs"] = Field(
        "auto",
        description="Batched generation (pairs, eval). graphs: mathwizard.decoding, a KV cache with one row per request"
        " in flight (up to 1,024, sized from free GPU memory), rows refilled as answers end, the decode step one CUDA"
        " graph attending over each row's valid cache slots (a Triton kernel), top-p over the top-k logits; gemma-3n"
        " only, falls back to eager on any failure. compiled: static KV"
        " cache in 512-token buckets and the step under torch.compile (backend hf only). eager: transformers'"
        " generate. auto: graphs (on a CPU without the CUDA graph, batch_size rows at once), eager for a model other"
        " than gemma-3n. Not part of any fingerprint: it changes speed, not which answers are possible.",
    )
    gpus: int | None = Field(
        None,
        ge=1,
        description="Processes a GPU stage (sft, dpo, pairs, eval) runs on, one per GPU: training data-parallel (DDP)"
        " with the recipe's effective batch kept (gradient_accumulation_steps divided by it), pairs and eval with the"
        " items split. None: every visible CUDA device (1 without CUDA). Without CUDA an explicit N runs N CPU"
        " processes (gloo), as the tests do. Not part of any fingerprint: a checkpoint resumes on another GPU count.",
    )


class LoRAConfig(_Stage):
    """LoRA adapters over the vision and language towers (the original: attention + MLP, all-linear)."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    finetune_vision_layers: bool = Field(True, description="Adapt the vision tower.")
    finetune_language_layers: bool = Field(True, description="Adapt the language model.")
    finetune_attention_modules: bool = Field(True, description="Adapt attention projections.")
    finetune_mlp_modules: bool = Field(True, description="Adapt MLP projections.")
    target_modules: str | list[str] = Field("all-linear", description="PEFT target modules.")
    modules_to_save: list[str] = Field(
        default_factory=lambda: ["lm_head", "embed_tokens"], description="Modules trained in full and saved."
    )


class TrainingConfig(_Stage):
    """Trainer settings SFT and DPO share (each stage's own class sets its defaults)."""

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps; None: num_train_epochs passes over the data (original: 320)."
    )
    num_train_epochs: float = Field(
        2.0,
        gt=0,
        description="Passes over the train split when max_steps is None; 2 on MM_Math's ~5,300 rows at 32 per step"
        " is about the original 320 steps, and on the bundled sample a run of a few steps.",
    )
    per_device_train_batch_size: int = Field(4, ge=1, description="Examples per device per micro-batch.")
    gradient_accumulation_steps: int = Field(8, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(2048, ge=32, description="Longest tokenized example; longer ones are truncated.")
    gradient_checkpointing: bool = Field(True, description="Trade compute for memory.")
    seed: int = Field(42, description="Seed for data order and initialisation.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every N steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (resume point after a kill).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    eval_steps: float | None = Field(
        0.1,
        gt=0,
        description="Evaluate on val every N steps, or every fraction of the run when below 1 (0.1: ten points on the"
        " curves); None: once at the end.",
    )
    report_to: Literal["none", "tensorboard", "trackio", "wandb", "mlflow"] = Field(
        "none",
        description="Experiment tracker the trainer logs to (transformers' report_to); tensorboard writes event files"
        " under <stage>/runs offline; wandb, mlflow and trackio need their package and settings.",
    )
    save_merged: bool = Field(False, description="Also save the adapter merged into the base weights.")
    optim: str = Field("adamw_torch", description="transformers optimizer name (adamw_8bit on CUDA saves memory).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    pad_to_multiple_of: int | None = Field(
        64,
        ge=1,
        description="Pad every training batch on the right to a multiple of this many tokens (both backends;"
        " mathwizard.training.padding), so a few batch shapes recur: cuDNN's attention builds its plans once per"
        " shape (seconds each on the H200), compiled layers recompile per shape (= max_length: one shape). None or"
        " 1: each batch as long as its longest row.",
    )
    limit: int | None = Field(None, ge=1, description="Train on only the first N examples (for trials).")


class SFTConfig(TrainingConfig):
    """Supervised fine-tuning on the teacher's solutions (loss on the answer only)."""

    lora: LoRAConfig = Field(default_factory=LoRAConfig)


class PairsConfig(_Stage):
    """Sample flawed answers from the SFT model to pair with the teacher's as DPO preferences."""

    splits: list[SplitName] = Field(default_factory=lambda: ["train", "val"], description="Splits to build pairs for.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (original: 1.0).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling (original: 0.95).")
    max_new_tokens: int | None = Field(
        None,
        ge=8,
        description="Most tokens per flawed answer; None: 1.5 x the longest chosen answer, in tokens, at most 1,024"
        " (original: 1024).",
    )
    batch_size: int = Field(64, ge=1, description="Prompts per generate call (left-padded; original: one at a time).")
    max_attempts: int = Field(3, ge=1, description="Samples per item before it is excluded.")
    chunk_size: int = Field(64, ge=1, description="Items per resumable chunk.")
    fallback: Literal["none", "rule"] = Field(
        "rule",
        description="After max_attempts, 'rule' writes a deterministic flaw into the chosen answer (offline demo);"
        " 'none' excludes the item.",
    )
    seed: int = Field(42, description="Seed for strategy choice and sampling.")
    limit: int | None = Field(None, ge=1, description="Only the first N items of each split.")


class DPOConfig(TrainingConfig):
    """Direct preference optimisation of the SFT model on the pairs (images included)."""

    lora: LoRAConfig = Field(default_factory=lambda: LoRAConfig(r=4, alpha=4, dropout=0.1))
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate (original: 5e-6).")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name.")
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps; None: num_train_epochs passes over the pairs (original: 100)."
    )
    num_train_epochs: float = Field(
        0.15,
        gt=0,
        description="Passes over the train pairs when max_steps is None; 0.15 of MM_Math's ~5,000 pairs at 8 per step"
        " is about the original 100 steps.",
    )
    per_device_train_batch_size: int = Field(2, ge=1, description="Pairs per device per micro-batch.")
    gradient_accumulation_steps: int = Field(4, ge=1, description="Micro-batches per optimizer step.")
    beta: float = Field(0.1, gt=0, description="DPO temperature beta.")
    max_prompt_length: int = Field(
        1024,
        ge=16,
        description="Pairs whose prompt (image tokens included) is longer are dropped and counted; TRL >= 1.0 has no"
        " prompt truncation, and cutting a prompt would cut its image.",
    )
    save_steps: int = Field(25, ge=1, description="Checkpoint every N steps.")


class EvalConfig(_Stage):
    """Accuracy of boxed answers on the test split, overall and by difficulty."""

    split: SplitName = Field("test", description="Split to evaluate on.")
    batch_size: int = Field(64, ge=1, description="Prompts per generate call (left-padded).")
    max_new_tokens: int | None = Field(
        None,
        ge=8,
        description="Most tokens per answer; None: 1.5 x the longest reference solution, in tokens, at most 1,024.",
    )
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N problems.")
    models: list[Literal["base", "sft", "dpo"]] = Field(
        default_factory=lambda: ["base", "sft", "dpo"], description="Which stages' models the pipeline evaluates."
    )


# ----------------------------------------------------------------------------------------- publish
class PublishConfig(_Stage):
    """Where the model and datasets go: Hub repos, or a local folder standing in for the Hub."""

    namespace: str = Field(
        "math-wizard", pattern=r"^[\w.-]+$", description="Hub user or organisation owning the repos."
    )
    model_repo: str | None = Field(
        None, pattern=r"^[\w.-]+/[\w.-]+$", description="Default: <namespace>/math-wizard-gemma-3n-dpo."
    )
    sft_dataset_repo: str | None = Field(
        None, pattern=r"^[\w.-]+/[\w.-]+$", description="Default: <namespace>/math-wizard-sft."
    )
    dpo_dataset_repo: str | None = Field(
        None, pattern=r"^[\w.-]+/[\w.-]+$", description="Default: <namespace>/math-wizard-dpo."
    )
    push: bool = Field(
        False,
        description="Upload the repos to the Hub (needs a Hub token: HF_TOKEN, `hf auth login` or the Secret block);"
        " false: only write them locally, whatever token is at hand.",
    )
    target: str | None = Field(
        None, description="Folder the repos are laid out in (default: the publish stage's folder)."
    )
    endpoint: str | None = Field(None, description="Hub endpoint (default: huggingface.co or HF_ENDPOINT).")
    private: bool = Field(True, description="Create the repos private (an existing repo keeps its visibility).")
    push_merged: bool = Field(False, description="Also upload merged weights (needs sft/dpo save_merged).")
    require_improvement: bool = Field(False, description="Refuse to publish a DPO model that scores below SFT.")
    include: list[Literal["model", "sft_dataset", "dpo_dataset"]] = Field(
        default_factory=lambda: ["model", "sft_dataset", "dpo_dataset"], description="Which repos to publish."
    )
    delete_stale: bool = Field(
        True, description="Delete files in a Hub repo that the run no longer produces (.gitattributes is kept)."
    )
    token_block: str | None = Field(
        "hf-token", description="Prefect Secret block holding the Hub token (read by the Prefect task only)."
    )
    model_license: str = Field("gemma", description="Licence id of the model repo (the base model's: Gemma terms).")
    data_license: str = Field("mit", description="Licence id of the dataset repos (MM_Math's: MIT).")

    def repo_ids(self) -> dict[str, str]:
        """Repo id of each publishable part, defaults derived from the namespace."""
        return {
            "model": self.model_repo or f"{self.namespace}/math-wizard-gemma-3n-dpo",
            "sft_dataset": self.sft_dataset_repo or f"{self.namespace}/math-wizard-sft",
            "dpo_dataset": self.dpo_dataset_repo or f"{self.namespace}/math-wizard-dpo",
        }


# ------------------------------------------------------------------------------------------ pipeline
class OrchestrationConfig(_Stage):
    """How the pipeline flow dispatches its stages."""

    gpu_deployments: dict[str, str] = Field(
        default_factory=dict,
        description="Stage -> full deployment name ('sft': 'math-wizard-gpu-sft/sft-on-cuda', see"
        " deployments/prefect.yaml); the listed stages run on that deployment's work pool.",
    )
    dispatch_gpu_stages: bool = Field(
        True,
        description="false: the stages gpu_deployments names run in the pipeline's own process too, as without"
        " gpu_deployments (one GPU machine: Unsloth's imports paid once and SFT's vision-tower figures shared with"
        " pairs, DPO and eval; the real recipe projected at 18.5 min of an H200 that way, 22.6 dispatched;"
        " README 'The real run'). MATHWIZARD_ORCHESTRATION__DISPATCH_GPU_STAGES=false.",
    )
    poll_seconds: float = Field(5.0, gt=0, description="How often the pipeline checks a dispatched GPU stage.")
    lock_wait_s: float = Field(
        0.0,
        ge=0,
        description="Seconds to wait while another run writes the same run folder (0: stop at once with its name).",
    )
    scratch: str | None = Field(
        None, description="Local folder caching remote stage folders (default: <temp dir>/mathwizard-scratch)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for a remote artifact root, e.g. {'endpoint_url': ...}; never credentials"
        " (those come from the environment, e.g. AWS_ACCESS_KEY_ID).",
    )

    @field_validator("gpu_deployments")
    @classmethod
    def _check_gpu_stages(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - {"sft", "pairs", "dpo", "eval"})
        if unknown:
            raise ValueError(f"gpu_deployments names unknown stages {unknown}; use sft, pairs, dpo or eval")
        bad = sorted(name for name in value.values() if name.count("/") != 1)
        if bad:
            raise ValueError(f"gpu_deployments values must look like 'flow-name/deployment-name', got {bad}")
        wrong = sorted(f"{stage}: {name}" for stage, name in value.items() if name.split("/")[0] != gpu_flow(stage))
        if wrong:
            expected = ", ".join(f"{stage}: {gpu_flow(stage)}/..." for stage in sorted(value))
            raise ValueError(f"gpu_deployments must name each stage's GPU flow ({expected}), got {wrong}")
        return value


def gpu_flow(stage: str) -> str:
    """The name of the flow that runs `stage` on a GPU worker (flows/gpu.py)."""
    return f"math-wizard-gpu-{stage}"


class Settings(BaseSettings):
    """Everything one run needs; `MATHWIZARD_SFT__MAX_STEPS=10` overrides a nested field."""

    model_config = SettingsConfigDict(
        env_prefix="MATHWIZARD_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        nested_model_default_partial_update=True,
    )

    home: str = Field("mathwizard-home", description="Artifact root: a folder or fsspec URL (s3://bucket/path).")
    run_name: str = Field("default", pattern=r"^[A-Za-z0-9._-]+$", description="Folder of this run under home/runs.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        yaml_file = settings_cls.model_config.get("yaml_file")
        if yaml_file:
            sources.append(_RecipeSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    @property
    def run_dir(self) -> str:
        """The run's folder (a local path or URL) under the artifact root."""
        return f"{self.home.rstrip('/')}/runs/{self.run_name}"

    def stage_dir(self, stage: str) -> str:
        return f"{self.run_dir}/{STAGE_DIRS[stage]}"

    @property
    def cache_dir(self) -> str:
        """Shared across runs, so a grown dataset only pays for its new rows."""
        return f"{self.home.rstrip('/')}/cache"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{key_node.start_mark.name}: key {key!r} appears twice in one mapping (lines {seen[key]} and"
                    f" {line}); a YAML loader would silently keep the last, so remove one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


class _RecipeSource(YamlConfigSettingsSource):
    """The YAML recipe: a mapping of settings, each key once."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        with Path(file_path).open(encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader) or {}  # a SafeLoader: no arbitrary objects
        if not isinstance(data, dict):
            names = {list: "a list", str: "a single string", int: "a number", float: "a number", bool: "a boolean"}
            kind = names.get(type(data), f"a {type(data).__name__}")
            raise ConfigError(
                f"{file_path} holds {kind}, not a mapping of settings; a recipe maps sections to their fields,"
                " e.g. `teacher: {kind: rule}` (see deployments/recipes/smoke.yaml)"
            )
        return data


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors())
    return f"invalid settings ({origin}): {problems}"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from defaults, an optional YAML file, `.env`, the environment and explicit overrides.

    Args:
        config_file: a YAML recipe such as `deployments/recipes/smoke.yaml`.
        overrides: nested dicts or values that win over every other source (the CLI's flags).

    Raises:
        ConfigError: the file is missing or unreadable, or a value is invalid (the message names the field).
    """
    settings_cls: type[Settings] = Settings
    origin = "defaults, .env and MATHWIZARD_* variables"
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist; pass a YAML recipe such as deployments/recipes/smoke.yaml"
            )
        settings_cls = type(
            "FileSettings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": str(path)}}
        )
        origin = f"{path}, {origin}"
    try:
        return settings_cls(**_drop_none(overrides))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin)) from None
    except (OSError, ValueError, yaml.YAMLError) as exc:  # unreadable YAML
        reason = " ".join(str(exc).split())
        raise ConfigError(f"cannot read settings from {origin}: {reason}") from None


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    """CLI flags left unset arrive as None and must not override lower sources."""
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            nested = _drop_none(value)
            if nested:
                cleaned[key] = nested
        elif value is not None:
            cleaned[key] = value
    return cleaned


# ------------------------------------------------------------------------------------------ secrets
class Secrets(BaseSettings):
    """API keys and tokens, read from the environment or `.env` when a call needs them; never logged or stored."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    teacher_api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("MATHWIZARD_TEACHER_API_KEY", "MATHWIZARD_TEACHER__API_KEY", "OPENAI_API_KEY"),
    )
    hf_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("MATHWIZARD_HF_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
    )


def load_secrets() -> Secrets:
    return Secrets()
