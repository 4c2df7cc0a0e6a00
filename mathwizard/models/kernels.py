"""Fused equivalents of gemma-3n's eager pieces, put on a loaded model in place (`model.kernels`).

Profiled on the H200, about 60 % of an SFT step's GPU time was elementwise kernels, most of them gemma-3n's own: each
of the ~10 RMSNorms of a decoder layer runs seven kernels over float32 copies of its input (cast, pow, mean, add, pow,
mul, mul, cast), AltUp mixes its 4 streams per token with a batched product of 4-wide matrices (slow cuBLAS kernels
plus permute copies), and Unsloth loads gemma-3n with eager attention (float32 scores and softmax materialised, KV
heads repeated). Each replacement computes the same function, up to float rounding:

- `rms_norm`: torch's fused RMSNorm (one kernel forward, one backward on CUDA; float32 inside, as gemma-3n's own).
- `sdpa`: the language model's attention through `scaled_dot_product_attention` with the KV heads shared, where the
  loader chose eager or transformers' SDPA.
- `altup`: AltUp's prediction mix as one Triton pass over the streams (`mathwizard.altup_mix`; PyTorch elsewhere).
- `sparsity`: the activation-sparsity cutoff of the first MLPs (`_gaussian_topk`) with its normal quantile made once
  per dtype, as a number; the model's own code builds it with `torch.tensor(..., device=cuda)` at every call, a
  host-to-device copy that makes the CPU wait for the GPU (10 times a forward on E2B), so the CPU cannot queue the
  next layers' kernels ahead of the GPU, and a CUDA graph cannot capture it (inference loads only, see
  `INFERENCE_ONLY`).
- `vision_attention`: the vision tower's multi-query attention blocks (timm's `MultiQueryAttention2d`) with their
  query heads folded into the query length, so that `scaled_dot_product_attention` sees one key/value head for one
  query head and takes a fused kernel. As timm calls it (8 query heads against 1 broadcast key head), PyTorch falls
  back to its math kernel, which upcasts bf16 to float32: matrix products off the tensor cores and float32 scores.
  Folded, the E2B tower ran 1.78x as fast on the H200 (benchmarks/gpu/bench_vision.py).
- `uniform_dtype`: every weight of a bf16 model in bf16. Unsloth loads gemma-3n's norm weights in float32
  (`UNSLOTH_HIGH_PRECISION_LAYERNORM`; on E2B 62 tensors of timm's `RmsNorm2d`/`RmsNormAct2d` in the vision tower),
  so the activation after each of them is float32 and the tower runs only under autocast, which computes timm's RMS
  norm (`pow`, `mean`, `rsqrt`) in float32; a model holding float32 weights also has to generate under autocast.
  The checkpoint holds these weights in bf16, so the cast is exact: the weights the hf backend loads. With it the
  figure cache computes new figures outside the trainers' autocast, as a generation load does: the Unsloth-loaded
  E2B tower 1.58x as fast on the H200, SFT's first epoch 1.12x, 4.8 GiB less (benchmarks/RESULTS.md, session 9).
- `vision_cache`: the frozen vision tower's output kept per figure (`FIGURE_CACHE_BYTES` at most). The tower was a
  third of an SFT step's GPU time, and an SFT run sees each figure once an epoch, DPO four times a pair (chosen and
  rejected, policy and reference). A figure is known by a hash of its pixel values' bits. The figures belong to the
  process, keyed by a hash of the tower's weights, so every later load of the same tower in the process reads them:
  LoRA leaves the tower as it is, so a one-GPU pipeline's pairs, DPO and eval stages find every training figure
  already computed by SFT. A training load starts the process's cache (dropping another tower's); an inference load
  only joins one that a training load started (a lone generation sees each figure once).

The patches are per instance (the module's `forward`/`predict`), so they hold whatever Unsloth patched on the
classes at import, survive PEFT wrapping and adapter merging, and leave the weights and the state dict untouched.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import types
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

KERNELS = ("uniform_dtype", "rms_norm", "sdpa", "altup", "sparsity", "vision_attention", "vision_cache")
# The row engine's CUDA graph needs `sparsity`; SFT ran 0.92x and 0.97x as fast with it as without (two A/Bs on the
# H200, benchmarks/RESULTS.md), so training loads keep gemma-3n's own cutoff.
INFERENCE_ONLY = ("sparsity",)
RMS_NORM_CLASS = "Gemma3nRMSNorm"
ALTUP_CLASS = "Gemma3nTextAltUp"
MLP_CLASS = "Gemma3nTextMLP"
VISION_CLASS = "TimmWrapperModel"  # gemma-3n's vision tower
MQA_CLASS = "MultiQueryAttention2d"  # timm's, in the tower's attention blocks
_PATCHED = {
    RMS_NORM_CLASS: ("forward",),
    ALTUP_CLASS: ("predict",),
    MLP_CLASS: ("_gaussian_topk",),
    VISION_CLASS: ("forward",),
    MQA_CLASS: ("forward",),
}
_KERNEL_CLASS = {
    "rms_norm": RMS_NORM_CLASS,
    "altup": ALTUP_CLASS,
    "sparsity": MLP_CLASS,
    "vision_attention": MQA_CLASS,
    "vision_cache": VISION_CLASS,
}
FIGURE_CACHE_BYTES = 8 * 2**30  # E2B: 1 MiB a figure (256 x 2,048 bf16), so ~8,000 figures; MM_Math trains on ~5,300


def apply_kernels(model: Any, kernels: Sequence[str], *, start_figure_cache: bool = True) -> dict[str, int]:
    """Put the chosen replacements on `model`; returns how many modules each one changed (0: nothing to change).
    `start_figure_cache`: `vision_cache` may start the process's figure cache (training loads); without it the tower
    is patched only when the process already holds figures of this same tower."""
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {', '.join(KERNELS)}")
    done: dict[str, int] = {}
    if "uniform_dtype" in kernels:  # first: the other kernels see the weights' final dtypes
        done["uniform_dtype"] = cast_to_bf16(model)
    if "rms_norm" in kernels:
        done["rms_norm"] = _patch_instances(model, RMS_NORM_CLASS, "forward", fused_rms_norm_forward)
    if "altup" in kernels:
        done["altup"] = _patch_instances(model, ALTUP_CLASS, "predict", fused_altup_predict)
    if "sparsity" in kernels:
        done["sparsity"] = _patch_instances(model, MLP_CLASS, "_gaussian_topk", cached_gaussian_topk)
    if "vision_attention" in kernels:
        done["vision_attention"] = _patch_instances(model, MQA_CLASS, "forward", folded_mqa_forward)
    if "vision_cache" in kernels:
        attach = functools.partial(_attach_figure_cache, start=start_figure_cache)
        patched = _patch_instances(model, VISION_CLASS, "forward", cached_vision_forward, attach)
        done["vision_cache"] = patched
    if "sdpa" in kernels:
        done["sdpa"] = int(use_sdpa_attention(model))
    if any(done.values()):
        log.info("model.kernels: %s", ", ".join(f"{name} ({count})" for name, count in done.items() if count))
    return done


def remove_kernels(model: Any, kernels: Sequence[str] = KERNELS) -> int:
    """Give the patched modules of `kernels` their class's own methods back (the attention setting stays); returns
    how many."""
    classes = {_KERNEL_CLASS[name] for name in kernels if name in _KERNEL_CLASS}
    count = 0
    for module in model.modules():
        if type(module).__name__ not in classes:
            continue
        if type(module).__name__ == VISION_CLASS:
            vars(module).pop(_FIGURES, None)
        for method in _PATCHED[type(module).__name__]:
            if method in vars(module):
                delattr(module, method)
                count += 1
    return count


def cast_to_bf16(model: Any) -> int:
    """`uniform_dtype`: the float32 weights of a model whose weights are mostly bf16 cast to bf16 in place (the same
    Parameter objects, so tied weights stay tied); returns how many. Buffers keep their dtype (rotary frequencies
    are float32 in every load), and so do adapters and fully trained copies (PEFT's `lora_`, `modules_to_save`),
    whose float32 is the trainer's choice. A float16 model is left alone: Unsloth's float32 there avoids overflow."""
    import torch

    sizes: dict[Any, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            sizes[param.dtype] = sizes.get(param.dtype, 0) + param.numel()
    if not sizes or max(sizes, key=sizes.__getitem__) != torch.bfloat16:
        return 0
    cast = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dtype == torch.float32 and "lora_" not in name and "modules_to_save" not in name:
                param.data = param.data.to(torch.bfloat16)
                cast += 1
    return cast


def _patch_instances(model: Any, class_name: str, method: str, replacement: Any, check: Any = None) -> int:
    count = 0
    for module in model.modules():
        if type(module).__name__ == class_name and (check is None or check(module)):
            setattr(module, method, types.MethodType(replacement, module))
            count += 1
    return count


def fused_rms_norm_forward(self: Any, hidden_states: Any) -> Any:
    """Gemma3nRMSNorm: x * (mean(x²) + eps)^-½ * weight in float32, rounded once to x's dtype, as one fused op.

    torch only fuses when the weight has the input's dtype (the model's own norms hold bf16 weights under bf16);
    another weight dtype takes the float32 route, still one norm kernel. Autocast is kept out: it would run the norm
    in float32 and hand float32 to the residual stream, which gemma-3n's own norm never does.
    """
    import torch
    import torch.nn.functional as F

    weight = self.weight if getattr(self, "with_scale", True) and hasattr(self, "weight") else None
    shape = (hidden_states.shape[-1],)
    with torch.autocast(hidden_states.device.type, enabled=False):
        if weight is None or weight.dtype == hidden_states.dtype:
            return F.rms_norm(hidden_states, shape, weight, self.eps)
        return F.rms_norm(hidden_states.float(), shape, weight.float(), self.eps).to(hidden_states.dtype)


def fused_altup_predict(self: Any, hidden_states: Any) -> Any:
    """Gemma3nTextAltUp.predict with the stream mix as one pass (`altup_mix`) instead of a batched 4-wide product."""
    from mathwizard.altup_mix import altup_mix

    streams = self.config.altup_num_inputs
    modalities = self.compute_router_modalities(hidden_states[self.config.altup_active_idx])
    if self.training and self.config.altup_coef_clip is not None:
        self.prediction_coefs.weight.data.clamp_(-self.config.altup_coef_clip, self.config.altup_coef_clip)
    coefs = self.prediction_coefs(modalities).reshape(*modalities.shape[:-1], streams, streams)
    return altup_mix(hidden_states, coefs)


def cached_gaussian_topk(self: Any, inputs: Any) -> Any:
    """Gemma3nTextMLP._gaussian_topk: relu(x - (mean + std * z)), z the standard normal quantile of the layer's
    sparsity rounded to x's dtype as the model rounds it, kept per dtype as a Python number: nothing is copied to the
    GPU (no sync) and a CUDA graph can capture it. The product is the same: torch multiplies a bf16 tensor by a
    0-dim bf16 tensor or by that number alike, in float32."""
    import torch

    quantiles = self.__dict__.setdefault("_sparsity_quantile", {})
    if inputs.dtype not in quantiles:
        z = torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(self.activation_sparsity, dtype=torch.float32))
        quantiles[inputs.dtype] = float(z.to(inputs.dtype))
    mean = torch.mean(inputs, dim=-1, keepdim=True)
    std = torch.std(inputs, dim=-1, keepdim=True, unbiased=False)
    return torch.nn.functional.relu(inputs - (mean + std * quantiles[inputs.dtype]))


def folded_mqa_forward(self: Any, x: Any, attn_mask: Any = None) -> Any:
    """timm's MultiQueryAttention2d.forward with the query heads folded into the query length: the single key and
    value head is shared by every query head, so attending with [B, 1, heads x L, k] queries is the same function,
    in a shape SDPA's fused kernels take (timm's [B, heads, L, k] against a broadcast [B, 1, P, k] is math-only, in
    float32). A mask, the einsum or unfused path, or active attention dropout go to timm's own forward."""
    import torch.nn.functional as F

    if attn_mask is not None or self.einsum or not self.fused_attn or (self.training and self.attn_drop.p > 0):
        return type(self).forward(self, x, attn_mask)
    batch, _, height, width = x.shape
    query = self._reshape_projected_query(self.query(x), self.num_heads, self.key_dim)  # [B, heads, L, k]
    key = self._reshape_input(self.key(x))  # [B, 1, P, k]
    value = self._reshape_input(self.value(x))  # [B, 1, P, v]
    heads, length = query.shape[1], query.shape[2]
    out = F.scaled_dot_product_attention(query.reshape(batch, 1, heads * length, -1), key, value, scale=self.scale)
    out = out.reshape(batch, heads, length, -1)
    out = self._reshape_output(out, self.num_heads, height // self.query_strides[0], width // self.query_strides[1])
    return self.output(out)


def use_sdpa_attention(model: Any) -> bool:
    """Switch the language model's attention from eager or transformers' SDPA (which copies the KV heads for every
    query head when there is a mask) to `sdpa_attention`, registered with transformers under `SDPA` with SDPA's
    boolean masks. Returns whether anything changed: a model on another kernel (flash, flex) keeps it."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    if text_config is None or getattr(text_config, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    _register_sdpa()
    model.set_attn_implementation({"text_config": SDPA})
    return text_config._attn_implementation == SDPA


SDPA = "mathwizard_sdpa"


def sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **_: Any,
) -> tuple[Any, None]:
    """transformers' attention function: `scaled_dot_product_attention` with the KV heads shared (no repeated copies)
    and the eager path's answer for a query that may attend to nothing (a left-padding position): all keys alike.
    SDPA would give such a row NaN gradients (torch's math kernel), which the backward spreads to every weight even
    though the loss never reads the row."""
    import torch

    if softcap is not None:
        raise NotImplementedError("attention soft-capping: use the eager attention (model.kernels without sdpa)")
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = attention_mask is None and q_length > 1 and getattr(module, "is_causal", True)
    if is_causal and kv_length > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = attention_mask | ~attention_mask.any(-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _register_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA, sdpa_attention)
    AttentionMaskInterface.register(SDPA, sdpa_mask)


# ------------------------------------------------------------------------------------------- vision cache
_FIGURES = "_mathwizard_figures"  # the instance attribute holding a patched tower's FigureCache


class FigureCache:
    """The vision tower's output per figure (detached; the tower is frozen), with how often it was used."""

    def __init__(self, max_bytes: int = FIGURE_CACHE_BYTES) -> None:
        self.features: dict[tuple, Any] = {}
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self.full_logged = False

    def store(self, key: tuple, feature: Any) -> None:
        size = feature.numel() * feature.element_size()
        if self.bytes + size > self.max_bytes:
            if not self.full_logged:
                held, gib = len(self.features), self.bytes / 2**30
                log.info("vision_cache: full at %d figures (%.1f GiB); new ones are computed each time", held, gib)
                self.full_logged = True
            return
        import torch

        with torch.inference_mode(False):  # a normal tensor even from generation: training may read it later
            self.features[key] = feature.detach().clone()
        self.bytes += size

    def clear(self) -> int:
        """Forget every figure; returns how many were held."""
        held = len(self.features)
        self.features.clear()
        self.bytes, self.full_logged = 0, False
        return held


def figure_cache(model: Any) -> FigureCache | None:
    """The cache of the model's patched vision tower (None: `vision_cache` is not on)."""
    for module in model.modules():
        if _FIGURES in vars(module):
            return vars(module)[_FIGURES]
    return None


def clear_figure_cache(model: Any) -> int:
    """Forget every cached figure (a benchmark measuring first sightings); returns how many were held."""
    cache = figure_cache(model)
    return 0 if cache is None else cache.clear()


class _ProcessFigures:
    """The process's figures: one tower's at a time (a pipeline trains one base model), known by its weights."""

    tower: tuple | None = None
    cache: FigureCache | None = None


def forget_figures() -> int:
    """Drop the process's figure cache (its memory returns once no loaded model holds it); returns how many figures it
    held. Benchmarks call it between variants that must each start with no figure known."""
    held = 0 if _ProcessFigures.cache is None else len(_ProcessFigures.cache.features)
    _ProcessFigures.tower = _ProcessFigures.cache = None
    return held


def _attach_figure_cache(tower: Any, start: bool = True) -> bool:
    """Give the tower the process's cache for its weights (a new one if `start` and there is none) if its output
    depends on its input alone in training mode too (no batch statistics, no active dropout; timm's MobileNetV5 in
    gemma-3n has RMS norms and dropout of rate 0)."""
    for module in tower.modules():
        name = type(module).__name__
        rate = getattr(module, "p", None) if "Dropout" in name else getattr(module, "drop_prob", None)
        if "BatchNorm" in name or (rate or 0.0) > 0.0:
            log.warning("vision_cache: not used, %s in the vision tower changes its output from call to call", name)
            return False
    weights = tower_fingerprint(tower)
    if weights != _ProcessFigures.tower:
        if not start:
            return False
        if _ProcessFigures.cache is not None:
            log.info("vision_cache: another vision tower; the %d figures of the last one are dropped", forget_figures())
        _ProcessFigures.tower, _ProcessFigures.cache = weights, FigureCache()
    elif _ProcessFigures.cache is not None and (held := len(_ProcessFigures.cache.features)):
        log.info("vision_cache: %d figures of this vision tower already computed in this process", held)
    if not start:
        tower.requires_grad_(False)  # an inference load never trains it (loaded weights require grad by default)
    vars(tower)[_FIGURES] = _ProcessFigures.cache
    return True


def compute_figures(model: Any, processor: Any, images: Iterable[Any], *, batch_size: int = 32) -> int:
    """Put the figures of `images` (PIL) into the model's figure cache, `batch_size` at a time without gradients;
    returns how many were new (0: no cache on the model, or all known). What a stage finds after SFT in one process
    (`benchmarks/gpu/bench_generation.py --figures known`). Computing a training run's figures this way before its
    first step was measured and dropped: 18.6 ms a figure on the H200 (the tower still under Unsloth's autocast,
    before `uniform_dtype`), no less than inside the first epoch's steps (benchmarks/RESULTS.md, session 8). The next
    chunk's figures are decoded and resized on a CPU thread while the tower runs."""
    import torch

    tower = next((m for m in model.modules() if _FIGURES in vars(m)), None)
    if tower is None:
        return 0
    cache: FigureCache = vars(tower)[_FIGURES]
    before = cache.misses

    def pixels(chunk: list[Any]) -> Any:
        if not chunk:
            return None
        return processor.image_processor([[image] for image in chunk], return_tensors="pt")["pixel_values"]

    images = iter(images)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mathwizard-figures") as pool, torch.no_grad():
        ahead = pool.submit(pixels, list(itertools.islice(images, batch_size)))
        while (chunk := ahead.result()) is not None:
            ahead = pool.submit(pixels, list(itertools.islice(images, batch_size)))
            if cache.full_logged:  # no room left: the rest are computed when a forward meets them
                break
            tower(pixel_values=chunk, do_pooling=False, return_dict=True)
    return cache.misses - before


def tower_fingerprint(tower: Any) -> tuple:
    """Which weights the tower holds: each tensor's name, shape and dtype, the device, and two sums of each tensor's
    bit patterns times fixed random odd 64-bit weights (repeating every 2^16 elements), as for figures. An adapter
    merged elsewhere and saved, then loaded again, gives the same tuple; any changed weight another one."""
    import torch

    tensors = [(name, t) for name, t in [*tower.named_parameters(), *tower.named_buffers()] if t.is_floating_point()]
    if not tensors:
        return ()
    period = 2**16
    weights = _odd_weights(period, seed=20261202, device=tensors[0][1].device)
    sums = []
    for _, tensor in tensors:
        bits = _bits(tensor.detach().reshape(-1))
        bits = torch.nn.functional.pad(bits, (0, -bits.numel() % period)).view(-1, period)
        sums.append((bits.unsqueeze(1) * weights).sum(dim=(0, 2)))
    layout = tuple((name, tuple(t.shape), str(t.dtype)) for name, t in tensors)
    return (str(tensors[0][1].device), layout, tuple(torch.stack(sums).reshape(-1).tolist()))


def cached_vision_forward(self: Any, pixel_values: Any, *args: Any, **kwargs: Any) -> Any:
    """TimmWrapperModel.forward with each figure's output computed once: figures seen before come from the cache,
    the others (each distinct one once) from the tower. Anything but gemma-3n's plain call (last hidden state, no
    pooling), and a tower with trainable weights, goes to the tower unchanged."""
    import torch
    from transformers.models.timm_wrapper.modeling_timm_wrapper import TimmWrapperModelOutput

    own = type(self).forward
    cache: FigureCache = vars(self)[_FIGURES]
    plain = not args and kwargs.get("do_pooling") is False and kwargs.get("return_dict", True) is not False
    plain = plain and not kwargs.get("output_hidden_states") and not kwargs.get("output_attentions")
    if not plain or any(p.requires_grad for p in self.parameters()):  # a tower in training: its output changes
        return own(self, pixel_values, *args, **kwargs)
    pixel_values = pixel_values.to(self.device, self.dtype)  # as the tower takes them: the key follows what it sees
    keys = figure_keys(pixel_values)  # the one host-device sync
    first: dict[tuple, int] = {}
    for row, key in enumerate(keys):
        if key not in cache.features:
            first.setdefault(key, row)
    cache.hits += len(keys) - len(first)
    cache.misses += len(first)
    computed: dict[tuple, Any] = {}
    if first:
        # In the tower's one dtype, outside a trainer's autocast (which would run its norms in float32), as a
        # generation load computes a figure; a tower of mixed dtypes needs the autocast to run at all.
        uniform = all(p.dtype == self.dtype for p in self.parameters() if p.is_floating_point())
        outside = torch.autocast(self.device.type, enabled=False) if uniform else contextlib.nullcontext()
        with torch.no_grad(), outside:
            out = own(self, pixel_values[list(first.values())], **kwargs)
        for key, feature in zip(first, out.last_hidden_state, strict=True):
            computed[key] = feature
            cache.store(key, feature)
        if len(first) == len(keys):
            return out
    features = [computed[key] if key in computed else cache.features[key] for key in keys]
    return TimmWrapperModelOutput(last_hidden_state=torch.stack(features))


_HASH_WEIGHTS: dict[tuple[int, str], Any] = {}


def figure_keys(pixel_values: Any) -> list[tuple]:
    """A key per figure: its dtype and shape, and two sums of its values' bit patterns times fixed random odd
    64-bit weights. Integer sums wrap exactly and in any order, so the same pixels give the same key in any batch;
    two different figures share one only by chance (about 2^-120 a pair)."""
    import torch

    flat = pixel_values.detach().reshape(pixel_values.shape[0], -1).contiguous()
    bits = _bits(flat)
    where = (flat.shape[1], str(flat.device))
    if where not in _HASH_WEIGHTS:
        _HASH_WEIGHTS[where] = _odd_weights(flat.shape[1], seed=20261201, device=flat.device)
    sums = torch.stack([(bits * weights).sum(-1) for weights in _HASH_WEIGHTS[where]], dim=-1)
    head = (str(pixel_values.dtype), *pixel_values.shape[1:])
    return [(*head, *row) for row in sums.tolist()]


def _bits(values: Any) -> Any:
    """The values' bit patterns as int64 (exact: integer sums of them wrap the same in any order)."""
    import torch

    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    return values.view(as_int).to(torch.int64)


def _odd_weights(length: int, *, seed: int, device: Any) -> Any:
    """Two rows of fixed random odd 64-bit weights (odd: no bit of a value is lost to the product's wrap)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-(2**62), 2**62, (2, length), generator=generator, dtype=torch.int64) | 1).to(device)
