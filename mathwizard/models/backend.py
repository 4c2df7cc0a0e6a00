"""The one place that switches between Unsloth (CUDA) and transformers + PEFT + TRL (any device).

Both backends take the same settings (`ModelConfig`, `LoRAConfig`, the stage configs). Unsloth patches
transformers and TRL when it is imported, so it must come first: `activate("unsloth")` imports it, and the
stages call `activate` before they import trl or transformers. Nothing here imports Unsloth on the `hf` path.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any, Literal

from mathwizard.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from mathwizard.config import LoRAConfig

log = logging.getLogger(__name__)

Backend = Literal["hf", "unsloth"]
BACKENDS = ("auto", "hf", "unsloth")

# How module names tell towers and kinds of layers apart (gemma-3n: vision_tower/embed_vision,
# language_model, audio_tower; self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj).
_VISION_TAGS = ("vision", "image", "visual", "patch")
_LANGUAGE_TAGS = ("language", "text")
_AUDIO_TAGS = ("audio",)
_ATTENTION_TAGS = ("self_attn", "attention", "attn")
_MLP_TAGS = ("mlp", "feed_forward", "ffn", "dense")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def resolve_backend(backend: str = "auto") -> Backend:
    """'auto' -> 'unsloth' when a CUDA GPU and Unsloth are present, else 'hf'.

    Raises:
        ConfigError: an unknown backend name.
        ModelError: 'unsloth' asked for without CUDA or without the package.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"model.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "hf":
        return "hf"
    cuda = cuda_available()
    if backend == "unsloth":
        if not cuda:
            raise ModelError("--backend unsloth needs a CUDA GPU and none is visible; use --backend hf (or auto)")
        if not unsloth_installed():
            raise ModelError("--backend unsloth needs the unsloth package: pip install 'mathwizard[gpu]'")
        return "unsloth"
    return "unsloth" if cuda and unsloth_installed() else "hf"


# What `model.compile` sets before Unsloth is imported (unsloth_zoo reads UNSLOTH_COMPILE_DISABLE at import;
# unsloth/models/_block_compile.py reads UNSLOTH_BLOCK_COMPILE when a model is patched). `layers` is `eager` for
# Unsloth; the decoder layers are compiled by us afterwards (`compile_for_training`).
_UNSLOTH_OFF: dict[str, str | None] = {"UNSLOTH_COMPILE_DISABLE": "1", "UNSLOTH_BLOCK_COMPILE": "0"}
COMPILE_ENV: dict[str, dict[str, str | None]] = {
    "eager": _UNSLOTH_OFF,
    "modules": {"UNSLOTH_COMPILE_DISABLE": None, "UNSLOTH_BLOCK_COMPILE": "0"},
    "unsloth": {"UNSLOTH_COMPILE_DISABLE": None, "UNSLOTH_BLOCK_COMPILE": None},
    "layers": _UNSLOTH_OFF,
}
_compile_mode: str | None = None


def configure_compile(mode: str) -> None:
    """Set Unsloth's compile switches for `mode` (eager | modules | unsloth | layers); call before `activate`.

    Unsloth reads them when it is imported, so a process keeps the Unsloth setting its first unsloth import saw;
    modes with the same switches (eager and layers) can follow each other in one process.
    """
    global _compile_mode
    import os
    import sys

    if mode not in COMPILE_ENV:
        raise ConfigError(f"model.compile must be one of {', '.join(COMPILE_ENV)}, got {mode!r}")
    if "unsloth" in sys.modules and _compile_mode is not None and COMPILE_ENV[_compile_mode] != COMPILE_ENV[mode]:
        log.warning("unsloth was imported with model.compile=%s; %s applies in a new process only", _compile_mode, mode)
        return
    for name, value in COMPILE_ENV[mode].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _compile_mode = mode


def activate(backend: Backend) -> None:
    """Import Unsloth before transformers/TRL on its path (it patches them at import); a no-op for 'hf'."""
    if backend != "unsloth":
        return
    import sys

    if "unsloth" not in sys.modules:
        if "transformers" in sys.modules:
            log.warning("transformers was imported before unsloth; Unsloth's patches may be incomplete")
        if _compile_mode is None:  # nobody chose: the settings' default, so every entry point bounds compile alike
            from mathwizard.config import ModelConfig

            configure_compile(ModelConfig.model_fields["compile"].default)
    import unsloth  # noqa: F401


# timm modules whose classes unsloth_zoo's `compile_timm_models` swaps to torch.compile'd forwards on every
# FastVisionModel load, whatever UNSLOTH_COMPILE_DISABLE says (unsloth_zoo 2026.10.9, compiler.py).
_TIMM_COMPILED_MODULES = ("timm.layers.norm_act", "timm.models._efficientnet_blocks")


def undo_timm_compile() -> list[str]:
    """Give timm's norm-act layers and EfficientNet/MobileNet blocks their plain forwards back.

    Unsloth compiles each of these classes with dynamic=None, so gemma-3n's MobileNetV5 vision tower, whose blocks
    differ in channels and strides, recompiles block after block: on the H100 the first E2B training step had not
    finished after 3 minutes with model.compile="eager" (traces: inductor inside mobilenetv5.forward_features).
    Returns the classes restored.
    """
    import importlib
    import sys

    restored = []
    for name in _TIMM_COMPILED_MODULES:
        module = sys.modules.get(name) or importlib.import_module(name)
        for cls_name, cls in vars(module).items():
            forward = cls.__dict__.get("forward") if isinstance(cls, type) else None
            original = getattr(forward, "_torchdynamo_orig_callable", None)
            if original is not None:
                cls.forward = original
                restored.append(f"{name}.{cls_name}")
    if restored:
        log.info("model.compile=%s: restored the eager forward of %d timm classes", _compile_mode, len(restored))
    return restored


# ---------------------------------------------------------------------------- regional compilation
# A decoder layer of the language model is found by its class name (gemma-3n: Gemma3nTextDecoderLayer), so the
# PEFT-wrapped and the Unsloth-loaded model match alike and the vision and audio towers never do.
DECODER_LAYER_SUFFIX = "TextDecoderLayer"
# torch.compile's backend for the layers; the tests use "aot_eager" (dynamo and AOTAutograd, forward and backward,
# without Inductor's code generation, which takes minutes on a small CPU).
LAYER_COMPILE_BACKEND = "inductor"
# All decoder layers share one forward (one code object), so dynamo counts their graphs together: one per kind of
# layer (sliding/full attention, sparse MLP or not, KV-shared or storing its KV: guards on the layers' attributes
# tell them apart) x grad mode (training; evaluation and DPO's reference under no_grad) x shapes (static, then
# dynamic), and for a checkpointed layer its recompute. gemma-3n E2B needs a few dozen; torch's default of 8 would
# leave the other layers eager.
RECOMPILE_LIMIT = 128
ACCUMULATED_RECOMPILE_LIMIT = 1024


def compile_for_training(model: Any, mode: str) -> int:
    """What `model.compile` does to a built trainer's model (after LoRA wrapping, before training): `layers`
    compiles the language model's decoder layers in place (`compile_decoder_layers`); the other modes are Unsloth's
    switches, already applied by `configure_compile`. Returns how many layers were compiled."""
    if mode != "layers":
        return 0
    return len(compile_decoder_layers(model))


def compile_decoder_layers(model: Any, *, backend: str | None = None) -> list[str]:
    """torch.compile each decoder layer of the language model in place (`nn.Module.compile`); returns their names.

    Each layer becomes one region that Inductor fuses, forward and backward (AOTAutograd): gemma-3n's float32
    RMSNorms, AltUp's streams, Laurel and the dtype casts are chains of small memory-bound kernels in eager mode.
    The vision and audio towers stay eager. Compilation happens at the layers' first calls, so it counts in the first
    training steps (and once more for evaluation and for the first batch of another shape: with the default
    `dynamic=None` dynamo marks the sequence dimension dynamic after it has seen a second length). The state dict is
    unchanged (no `_orig_mod.` prefix), so checkpoints and adapters are the same as eager ones. Works on any device
    (CPU: Inductor's C++ backend) and in every process of a data-parallel launch (each compiles its own layers before
    DDP wraps the model). A model without such layers is left eager with a warning.
    """
    layers = [
        (name, module) for name, module in model.named_modules() if type(module).__name__.endswith(DECODER_LAYER_SUFFIX)
    ]
    if not layers:
        log.warning("model.compile=layers: no *%s module in this model; it trains eagerly", DECODER_LAYER_SUFFIX)
        return []
    raise_recompile_limits()
    backend = backend or LAYER_COMPILE_BACKEND
    for _, layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:  # compiling twice would wrap the compiled call
            layer.compile(backend=backend)  # dynamic=None: automatic dynamic shapes after a second shape
    kinds = sorted({type(module).__name__ for _, module in layers})
    log.info(
        "model.compile=layers: %d decoder layers (%s) compiled in place with torch.compile(backend=%r); they compile"
        " during the first steps",
        len(layers),
        ", ".join(kinds),
        backend,
    )
    return [name for name, _ in layers]


def raise_recompile_limits(limit: int = RECOMPILE_LIMIT, accumulated: int = ACCUMULATED_RECOMPILE_LIMIT) -> None:
    """Raise dynamo's recompile limits to at least `limit` graphs per code object (`accumulated` in all), under the
    names this torch has (`recompile_limit`, or `cache_size_limit` on older releases).

    Newer torch keeps a value set on its config per thread (a ContextVar), so autograd's worker threads (the backward
    on CUDA, where a checkpointed layer's forward is recomputed) would still see the default; the default is raised
    too where the config has one, so every thread gets the same limits.
    """
    import torch._dynamo.config as dynamo_config

    wanted = {
        ("recompile_limit", "cache_size_limit"): limit,
        ("accumulated_recompile_limit", "accumulated_cache_size_limit"): accumulated,
    }
    for names, floor in wanted.items():
        name = next((n for n in names if hasattr(dynamo_config, n)), None)
        if name is None:
            continue
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), floor))
        entry = getattr(dynamo_config, "_config", {}).get(name)
        if entry is not None and isinstance(getattr(entry, "default", None), int):
            entry.default = max(entry.default, floor)


def torch_dtype(dtype: str) -> Any:
    """'auto' -> bfloat16 on CUDA, float32 on CPU (CPU bf16 kernels are slow and imprecise)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if cuda_available() else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    except KeyError:
        raise ConfigError(f"model.dtype must be auto, bfloat16, float16 or float32, got {dtype!r}") from None


# ------------------------------------------------------------------------------------------- loading
def load_pretrained(
    path: str, backend: Backend, *, for_training: bool, dtype: str, load_in_4bit: bool, max_seq_length: int
) -> tuple[Any, Any]:
    """Base model + processor from a local folder or a Hub id (local HF cache when offline)."""
    from mathwizard.models.tiny import register_timm_architectures

    activate(backend)
    register_timm_architectures()
    torch_type = torch_dtype(dtype)
    if backend == "unsloth":
        from unsloth import FastVisionModel

        model, processor = FastVisionModel.from_pretrained(
            model_name=path,
            max_seq_length=max_seq_length,
            dtype=torch_type,
            load_in_4bit=load_in_4bit,
            full_finetuning=False,
            # Checkpointing is the LoRA's to decide (add_lora: sft/dpo.gradient_checkpointing), not the loader's.
            use_gradient_checkpointing=False,
        )
        if _compile_mode != "unsloth":  # only Unsloth's own default keeps its timm compilation
            undo_timm_compile()
        if not for_training:
            FastVisionModel.for_inference(model)
        return model, processor

    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {"dtype": torch_type}
    if load_in_4bit:
        if not cuda_available():
            raise ModelError("model.load_in_4bit needs a CUDA GPU (bitsandbytes); set it to false on this machine")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_type,
            llm_int8_skip_modules=["vision_tower", "audio_tower", "embed_vision", "embed_audio", "lm_head"],
        )
    if cuda_available():
        import torch

        kwargs["device_map"] = {"": torch.cuda.current_device()}  # a rank of a launch: its own GPU (launch.py)
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path)
    model.train(for_training)
    return model, processor


def attach_adapter(model: Any, adapter_dir: str, backend: Backend, *, for_training: bool, merge: bool) -> Any:
    """Put a saved LoRA adapter on `model`; merged into the weights when `merge` (faster generation, no PEFT)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=for_training)
    if merge:
        return peft_model.merge_and_unload()
    if not for_training:
        peft_model.eval()
    return peft_model


# ---------------------------------------------------------------------------------------------- LoRA
def lora_target_modules(model: Any, lora: LoRAConfig) -> list[str]:
    """Full names of the Linear layers LoRA adapts, from the vision/language/attention/MLP switches; both backends
    adapt exactly these (Unsloth is handed this list).

    A layer is adapted when it sits in an enabled tower (vision or language) and in an enabled kind of block
    (attention or MLP), and its name is in `target_modules` ("all-linear": every Linear). Never adapted: the audio
    tower (the pipeline feeds no audio), the audio/vision embedders' projections (`embed_audio`, `embed_vision`), the
    language model's AltUp, Laurel and per-layer-input projections, and `lm_head`. On gemma-3n that leaves the
    q/k/v/o and gate/up/down projections of every decoder layer (KV-shared layers have no k/v): its MobileNetV5
    vision tower is convolutional, so the vision switch adds nothing there. Unsloth's own selection for "all-linear"
    would also take the audio tower and both embedders' projections (10.5 M more parameters on E2B).
    """
    import torch

    if not (lora.finetune_vision_layers or lora.finetune_language_layers):
        raise ConfigError("lora: enable finetune_vision_layers or finetune_language_layers (both are false)")
    if not (lora.finetune_attention_modules or lora.finetune_mlp_modules):
        raise ConfigError("lora: enable finetune_attention_modules or finetune_mlp_modules (both are false)")
    wanted = None if lora.target_modules == "all-linear" else set(_as_list(lora.target_modules))
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        lowered = name.lower()
        if wanted is not None and name.rsplit(".", 1)[-1] not in wanted:
            continue
        if any(tag in lowered for tag in _AUDIO_TAGS):
            continue
        in_vision = any(tag in lowered for tag in _VISION_TAGS)
        in_language = not in_vision and any(tag in lowered for tag in _LANGUAGE_TAGS)
        if not ((in_vision and lora.finetune_vision_layers) or (in_language and lora.finetune_language_layers)):
            continue
        is_attention = any(tag in lowered for tag in _ATTENTION_TAGS)
        is_mlp = any(tag in lowered for tag in _MLP_TAGS)
        if (is_attention and lora.finetune_attention_modules) or (is_mlp and lora.finetune_mlp_modules):
            selected.append(name)
    if not selected:
        raise ConfigError(f"lora.target_modules={lora.target_modules!r} matches no layer of this model")
    return selected


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def add_lora(model: Any, lora: LoRAConfig, backend: Backend, *, seed: int, gradient_checkpointing: bool) -> Any:
    """A trainable LoRA model over `model` with the configured switches, rank, alpha and dropout."""
    if backend == "unsloth":
        from unsloth import FastVisionModel

        checkpointing = "unsloth" if gradient_checkpointing else False
        model = FastVisionModel.get_peft_model(
            model,
            # Our selection, not Unsloth's: the switches are already applied to the list (lora_target_modules), and
            # Unsloth takes an explicit list as it is only when every switch is on.
            finetune_vision_layers=True,
            finetune_language_layers=True,
            finetune_attention_modules=True,
            finetune_mlp_modules=True,
            target_modules=lora_target_modules(model, lora),
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias="none",
            random_state=seed,
            modules_to_save=list(lora.modules_to_save) or None,
            use_gradient_checkpointing=checkpointing,
        )
        FastVisionModel.for_training(model, use_gradient_checkpointing=checkpointing)
        return model

    import torch
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A matrices are random: same seed, same start
        peft_model = get_peft_model(model, lora_config(model, lora))
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


def lora_config(model: Any, lora: LoRAConfig) -> Any:
    """The PEFT LoraConfig for `model` (hf path): rank, alpha, dropout, selected layers, modules trained in full."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        target_modules=lora_target_modules(model, lora),
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
        # gemma-3n ties lm_head to embed_tokens: train one shared copy, so the merged model stays tied.
        ensure_weight_tying=bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False)),
    )


# ----------------------------------------------------------------------------------------- training
def sft_collator(model: Any, processor: Any, backend: Backend, *, max_length: int):
    """Unsloth's vision collator (prompt/completion: loss on the completion); None lets TRL pick its own. Either is
    padded to `pad_to_multiple_of` by `training.padding` afterwards."""
    if backend != "unsloth":
        return None
    from unsloth.trainer import UnslothVisionDataCollator

    return UnslothVisionDataCollator(
        model,
        processor,
        max_seq_length=max_length,
        completion_only_loss=True,
        resize="max",  # the processor resizes to the model's input size itself
    )


def patch_dpo(backend: Backend) -> None:
    """Unsloth's faster DPO trainer patches TRL's DPOTrainer in place; must run before DPOTrainer is built."""
    if backend == "unsloth":
        from unsloth import PatchDPOTrainer

        PatchDPOTrainer()


def save_merged(model: Any, processor: Any, out: str, backend: Backend) -> None:
    """Write the adapter merged into the base weights (16-bit on GPU) with the processor."""
    if backend == "unsloth":
        model.save_pretrained_merged(out, processor, save_method="merged_16bit")
        return
    # Merged in place: the adapter is saved already and this is the model's last use (no second copy in memory).
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    processor.save_pretrained(out)
