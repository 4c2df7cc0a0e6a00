"""Batched decoding for gemma-3n: a KV cache with one row per request, finished rows refilled, the step one CUDA graph.

transformers' `generate` runs one batch to the end of its longest answer and, on gemma-3n, spends far more time
launching its thousands of small kernels than reading the weights. This engine (`model.decode: graphs`) instead:

- keeps a static KV cache with one row per request in flight and per-row positions, so a row whose answer ended is
  refilled with the next request (prefilled into that row) while the others keep decoding, and rows need no padding;
- replays the whole decode step (embeddings, 30 layers, LM head, sampling, bookkeeping) as one CUDA graph, captured
  in seconds, with no `torch.compile` (eager kernels, no launch gaps);
- attends over each row's valid cache slots only, reading each key and value once for the query heads that share
  it (a Triton kernel on CUDA: `mathwizard.decode_attention`);
- samples top-k then top-p over the k best logits (no sort or float32 copy of the 262k vocabulary) with the
  Gumbel-max trick, which is the same distribution as transformers' temperature -> top-k -> top-p -> multinomial.

On a CPU the same engine runs without the graph (tests compare it with `generate`). The model must be gemma-3n
(`Gemma3nForConditionalGeneration`); `supports(model)` says whether it is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_ROWS = 1024  # rows decoded at once at most: a step's time hardly grows with rows (launch-bound), memory does
CACHE_BUCKET = 256  # the full-attention cache length is rounded up to a multiple of this
MEMORY_SHARE = 0.6  # of the free GPU memory at start, what the KV cache may take (the rest: prefill, logits)
CHECK_EVERY = 16  # decode steps between looks at which rows finished (each look waits for the GPU)
ATTENTION = "mathwizard_rows"  # the attention function registered with transformers for this engine


def supports(model: Any) -> bool:
    """Whether `model` is a gemma-3n this engine can decode (text config with AltUp and KV sharing)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "gemma3n" and hasattr(model, "model") and hasattr(model, "lm_head")


# ----------------------------------------------------------------------------------------------- sampling
def sample_next(logits: Any, temperature: float, top_k: int | None, top_p: float, greedy: bool) -> Any:
    """Next token per row from `logits` [rows, vocab]: argmax, or temperature -> top-k -> top-p sampling.

    Top-p runs over the top-k logits only (sorted by `topk`), so the vocabulary is never sorted; without a top-k it
    sorts all of it. The k best are taken in the logits' own dtype and only they are widened to float32 and divided
    by the temperature (a positive scale keeps the order): the same values generate's float32 warpers see. The draw
    is argmax(log p + Gumbel noise), which samples p exactly and needs no host sync.
    """
    import torch

    if greedy:
        return logits.argmax(-1)
    if top_k:
        values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        values = values.float() / temperature
    else:
        values, indices = (logits.float() / temperature).sort(dim=-1, descending=True)
    if top_p < 1.0:
        probs = values.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above this one
        values = values.masked_fill(mass_before >= top_p, float("-inf"))  # the first token is always kept
    uniform = torch.rand_like(values).clamp_(min=1e-20, max=1.0 - 1e-7)
    choice = (values - torch.log(-torch.log(uniform))).argmax(-1, keepdim=True)
    return indices.gather(-1, choice).squeeze(-1)


# ---------------------------------------------------------------------------------------------- attention
def rows_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function for the engine's two kinds of forward.

    Decode step (one query per row): `attention_mask` is each row's count of valid cache slots [rows] (a prefix,
    `decode_lengths`), and `mathwizard.decode_attention` reads just those. Prefill: `attention_mask` is boolean
    [rows, 1, queries, keys] (True = attend; causal, no padding keys, the window on sliding layers), for
    scaled_dot_product_attention with the KV heads shared (`mathwizard.models.kernels.sdpa_attention`).
    """
    import torch

    from mathwizard.decode_attention import decode_attention
    from mathwizard.models.kernels import sdpa_attention

    if softcap is not None:
        raise NotImplementedError("attention soft-capping is not supported by the row engine")
    scale = scaling if scaling is not None else query.shape[3] ** -0.5
    if attention_mask.dtype != torch.bool:  # a decode step's valid slots per row
        return decode_attention(query, key, value, attention_mask, scale), None
    key, value = key.to(query.dtype), value.to(query.dtype)
    return sdpa_attention(module, query, key, value, attention_mask, scaling=scale)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, rows_attention)


# ------------------------------------------------------------------------------------------------- cache
class RowCache:
    """The KV cache of the layers that store one (gemma-3n's last layers share an earlier layer's), a row per request.

    Full-attention layers keep `length` slots per row, a slot per position; sliding-window layers a ring of
    `window` slots (position p in slot p % window). One more slot per row takes the writes that must land nowhere
    (a prompt's padding), and masks never select it. `update` is what gemma-3n's attention calls.
    """

    def __init__(self, text_config: Any, rows: int, length: int, device: Any, dtype: Any) -> None:
        import torch

        self.rows, self.length, self.window = rows, length, text_config.sliding_window
        self.kinds = text_config.layer_types
        stored = text_config.num_hidden_layers - text_config.num_kv_shared_layers
        heads, dim = text_config.num_key_value_heads, text_config.head_dim
        self.keys: dict[int, Any] = {}
        self.values: dict[int, Any] = {}
        for layer in range(stored):
            slots = (self.window if self.kinds[layer] == "sliding_attention" else length) + 1
            self.keys[layer] = torch.zeros(rows, heads, slots, dim, device=device, dtype=dtype)
            self.values[layer] = torch.zeros(rows, heads, slots, dim, device=device, dtype=dtype)
        self.prefill: dict[str, Any] | None = None  # set around a prefill: rows and slot indices per kind
        self.decode_slots: dict[str, Any] = {}  # set for decode steps: slot per row per kind

    @staticmethod
    def bytes_per_row(text_config: Any, length: int, dtype_bytes: int) -> int:
        stored = text_config.num_hidden_layers - text_config.num_kv_shared_layers
        slots = sum(
            (text_config.sliding_window if kind == "sliding_attention" else length) + 1
            for kind in text_config.layer_types[:stored]
        )
        return 2 * slots * text_config.num_key_value_heads * text_config.head_dim * dtype_bytes

    def update(self, key: Any, value: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        import torch

        kind = self.kinds[layer_idx]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # Stored in the cache's dtype: a model that keeps some modules in float32 (Unsloth's gemma-3n does) can
        # hand over float32 states in a bf16 model.
        if self.prefill is not None:  # write the prompt's real tokens; attend over the fresh states
            rows, slots = self.prefill["rows"], self.prefill[kind]
            keys[rows[:, None], :, slots] = key.transpose(1, 2).to(keys.dtype)
            values[rows[:, None], :, slots] = value.transpose(1, 2).to(values.dtype)
            return key, value
        slots = self.decode_slots[kind]
        every = torch.arange(self.rows, device=keys.device)
        keys[every, :, slots] = key[:, :, 0].to(keys.dtype)
        values[every, :, slots] = value[:, :, 0].to(values.dtype)
        return keys, values

    # transformers asks a cache these when it meets one; the engine passes masks and positions itself.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    is_compileable = False


def prefill_slots(lengths: Any, width: int, length: int, window: int) -> dict[str, Any]:
    """Slot of each prompt position [rows, width] per layer kind; padding (and, for the ring, tokens that fall out
    of the window) goes to the spare last slot."""
    import torch

    positions = torch.arange(width, device=lengths.device)[None, :].expand(len(lengths), -1)
    real = positions < lengths[:, None]
    full = torch.where(real, positions, torch.full_like(positions, length))
    in_window = real & (positions >= lengths[:, None] - window)
    sliding = torch.where(in_window, positions % window, torch.full_like(positions, window))
    return {"full_attention": full, "sliding_attention": sliding}


def prefill_masks(lengths: Any, width: int, window: int) -> dict[str, Any]:
    """Boolean masks [rows, 1, width, width]: causal, no padding keys, and the window for sliding layers."""
    import torch

    q = torch.arange(width, device=lengths.device)[:, None]
    k = torch.arange(width, device=lengths.device)[None, :]
    causal = (k <= q)[None] & (k[None] < lengths[:, None, None])
    return {
        "full_attention": causal[:, None],
        "sliding_attention": (causal & (q - k < window)[None])[:, None],
    }


def decode_lengths(positions: Any, length: int, window: int) -> dict[str, Any]:
    """Valid cache slots per row [rows] for one decode step at `positions`, per layer kind: a prefix of the row's
    slots in both (full attention: positions 0..p; the sliding ring: its filled part, all of it once it wrapped)."""
    import torch

    filled = positions + 1
    return {
        "full_attention": filled.clamp(max=length).to(torch.int32),
        "sliding_attention": filled.clamp(max=window).to(torch.int32),
    }


# ------------------------------------------------------------------------------------------ the model
class _Gemma3n:
    """The pieces of a loaded gemma-3n the engine calls, and its decode-step forward."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model
        self.mm = model.model  # Gemma3nModel: towers, embedders, language model
        self.lm = self.mm.language_model
        self.config = self.lm.config
        self.softcap = self.config.final_logit_softcapping
        param = next(self.lm.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.epsilon = torch.tensor(1e-5, device=self.device)

    def logits(self, hidden: Any) -> Any:
        """Logits as the model computes them, in the weights' dtype (head and soft-capping): `sample_next` widens
        only the top-k to float32, not 262k values a row."""
        import torch

        logits = self.model.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def embed(self, input_ids: Any) -> tuple[Any, Any]:
        """Token embeddings and per-layer inputs for text, vision and audio token ids (as Gemma3nModel.forward)."""
        import torch

        mm = self.mm
        embeds = mm.get_input_embeddings()(input_ids)
        text = (input_ids >= 0) & (input_ids < mm.vocab_size_per_layer_input)
        per_layer = self.lm.get_per_layer_inputs(torch.where(text, input_ids, torch.zeros_like(input_ids)))
        for embedder, low, high in (
            (mm.embed_vision, mm.embed_vision.vocab_offset, mm.embed_audio.vocab_offset),
            (mm.embed_audio, mm.embed_audio.vocab_offset, None),
        ):
            inside = (input_ids >= low) if high is None else ((input_ids >= low) & (input_ids < high))
            dummy = embedder.vocab_offset + embedder.vocab_size - 1
            other = embedder(input_ids=torch.where(inside, input_ids, torch.full_like(input_ids, dummy)))
            embeds = torch.where(inside[..., None], other.to(embeds.dtype), embeds)
        return embeds, per_layer

    def decode_hidden(self, input_ids: Any, positions: Any, lengths: dict[str, Any], cache: RowCache) -> Any:
        """Gemma3nTextModel.forward for one token per row, with nothing that copies from the host (capturable)."""
        import torch

        lm, config = self.lm, self.config
        embeds, per_layer = self.embed(input_ids)
        per_layer = lm.project_per_layer_inputs(embeds, per_layer)
        position_ids = positions[:, None]
        target = torch.mean(embeds**2, dim=-1, keepdim=True) ** 0.5
        streams = [embeds]
        for projection in lm.altup_projections:
            projected = projection(embeds).to(embeds.dtype)
            magnitude = torch.sqrt(torch.maximum(torch.mean(projected**2, dim=-1, keepdim=True), self.epsilon))
            streams.append(projected * target / magnitude)
        hidden = torch.stack(streams, dim=0)
        rotary = {kind: lm.rotary_emb(hidden, position_ids, kind) for kind in set(config.layer_types)}
        shared: dict[int, Any] = {}
        for i, layer in enumerate(lm.layers[: config.num_hidden_layers]):
            kind = config.layer_types[i]
            hidden = layer(
                hidden,
                rotary[kind],
                per_layer[:, :, i, :],
                shared_kv_states=shared,
                attention_mask=lengths[kind],  # rows_attention reads a step's valid slots from it
                position_ids=position_ids,
                past_key_values=cache,
            )
        target = torch.mean(hidden[0] ** 2, dim=-1, keepdim=True) ** 0.5
        streams = [hidden[0]]
        for i, projection in enumerate(lm.altup_unembed_projections):
            projected = projection(hidden[i + 1]).to(embeds.dtype)
            magnitude = torch.sqrt(torch.maximum(torch.mean(projected**2, dim=-1, keepdim=True), self.epsilon))
            streams.append(projected * target / magnitude)
        return lm.norm(torch.mean(torch.stack(streams), dim=0))


# ------------------------------------------------------------------------------------------------ engine
def _pixels(processor: Any, image: Any) -> Any:
    from mathwizard.generation import to_pil

    return processor.image_processor([[to_pil(image)]], return_tensors="pt")["pixel_values"]


# Decoding and resizing figures on the CPU (PIL releases the GIL) for a prefill of many prompts, one image each, in
# parallel: one at a time it took longer than the prefill's forward pass.
_IMAGES = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="mathwizard-images")


@dataclass
class Prompt:
    """One request as the engine sees it: its token ids (image tokens expanded) and its image."""

    index: int
    input_ids: list[int]
    image: Any


@dataclass
class Answer:
    index: int
    tokens: list[int]


class RowEngine:
    """Decodes many prompts through `rows` cache rows, refilling rows as answers end.

    Args:
        model: a loaded gemma-3n (eval mode).
        rows: cache rows (requests in flight at once).
        length: full-attention slots per row (longest prompt + max_new_tokens, at most).
        eos_ids: tokens that end an answer.
        graphs: capture the decode step as a CUDA graph (CUDA only).
        prefill_rows: prompts prefilled per forward (bounds the vision tower's and the prompt's memory).
    """

    def __init__(
        self,
        model: Any,
        rows: int,
        length: int,
        eos_ids: Sequence[int],
        *,
        graphs: bool,
        prefill_rows: int = 32,
    ) -> None:
        import torch

        _register_attention()
        self.net = _Gemma3n(model)
        self.rows, self.length, self.graphs, self.prefill_rows = rows, length, graphs, prefill_rows
        config = self.net.config
        self.window = config.sliding_window
        device = self.net.device
        self.cache = RowCache(config, rows, length, device, self.net.dtype)
        self.eos = torch.tensor(sorted(eos_ids), device=device)
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.counts = torch.zeros(rows, dtype=torch.long, device=device)
        self.limits = torch.zeros(rows, dtype=torch.long, device=device)
        self.done = torch.ones(rows, dtype=torch.bool, device=device)
        self.out: Any = None
        self.graph: Any = None
        self.sampling: tuple[float, int | None, float, bool] = (1.0, None, 1.0, True)
        self.step_events: list[tuple[Any, Any]] = []
        self.phase_s = {"prefill": 0.0, "capture": 0.0}  # wall seconds, measured with `time_steps` (GPU synced)

    # --- the step
    def _step(self) -> None:
        import torch

        every = torch.arange(self.rows, device=self.tokens.device)
        self.cache.decode_slots = {
            "full_attention": self.positions.clamp(max=self.length - 1),
            "sliding_attention": self.positions % self.window,
        }
        lengths = decode_lengths(self.positions, self.length, self.window)
        hidden = self.net.decode_hidden(self.tokens, self.positions, lengths, self.cache)
        nxt = sample_next(self.net.logits(hidden[:, -1]), *self.sampling)
        live = ~self.done
        at = self.counts.clamp(max=self.out.shape[1] - 1)
        self.out[every, at] = torch.where(live, nxt, self.out[every, at])
        self.counts += live.long()
        ended = (nxt[:, None] == self.eos[None, :]).any(-1) | (self.counts >= self.limits)
        self.done |= live & ended
        self.tokens[:, 0] = nxt
        self.positions.copy_(torch.clamp(self.positions + 1, max=self.length - 1))

    def _capture(self) -> None:
        import torch

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        saved = [t.clone() for t in (self.tokens, self.positions, self.counts, self.done, self.out)]
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph: cuBLAS handles, allocator pools
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        for target, value in zip((self.tokens, self.positions, self.counts, self.done, self.out), saved, strict=True):
            target.copy_(value)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        for target, value in zip((self.tokens, self.positions, self.counts, self.done, self.out), saved, strict=True):
            target.copy_(value)  # capture ran the step once more; undo it

    def step(self, time_it: bool = False) -> None:
        import torch

        time_it = time_it and self.tokens.device.type == "cuda"  # CUDA events time the GPU's work
        if time_it:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        if time_it:
            end.record()
            self.step_events.append((start, end))

    # --- prefill
    def _prefill(self, rows: list[int], prompts: list[Prompt], processor: Any, limits: list[int]) -> None:
        import torch

        net, device = self.net, self.net.device
        width = max(len(p.input_ids) for p in prompts)
        pad = processor.tokenizer.pad_token_id or 0
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p.input_ids)] = torch.tensor(p.input_ids)
        ids = ids.to(device)
        lengths = torch.tensor([len(p.input_ids) for p in prompts], device=device)
        pixels = torch.cat(list(_IMAGES.map(lambda p: _pixels(processor, p.image), prompts)))
        row_index = torch.tensor(rows, device=device)
        self.cache.prefill = {"rows": row_index, **prefill_slots(lengths, width, self.length, self.window)}
        try:
            out = net.mm(
                input_ids=ids,
                pixel_values=pixels.to(device, net.dtype),
                attention_mask=prefill_masks(lengths, width, self.window),
                position_ids=torch.arange(width, device=device)[None].expand(len(prompts), -1),
                past_key_values=self.cache,
                use_cache=True,
            )
        finally:
            self.cache.prefill = None
        last = out.last_hidden_state[torch.arange(len(prompts), device=device), lengths - 1]
        first = sample_next(net.logits(last), *self.sampling)
        self.tokens[row_index, 0] = first
        self.positions[row_index] = lengths
        self.out[row_index] = 0
        self.out[row_index, 0] = first
        self.counts[row_index] = 1
        self.limits[row_index] = torch.tensor(limits, device=device)
        self.done[row_index] = (first[:, None] == self.eos[None, :]).any(-1) | (self.limits[row_index] <= 1)

    def _fill(self, rows: list[int], queue: list[Prompt], processor: Any, max_new: int, where: dict[int, int]) -> None:
        while rows and queue:
            take = min(len(rows), self.prefill_rows, len(queue))
            chosen, rows[:] = rows[:take], rows[take:]
            prompts, queue[:] = queue[:take], queue[take:]
            limits = [min(max_new, self.length - len(p.input_ids)) for p in prompts]
            self._prefill(chosen, prompts, processor, limits)
            for row, prompt in zip(chosen, prompts, strict=True):
                where[row] = prompt.index

    # --- the loop
    def run(
        self,
        prompts: Sequence[Prompt],
        processor: Any,
        *,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float,
        seed: int | None,
        time_steps: bool = False,
    ) -> list[Answer]:
        """Answers for `prompts` (in their order), each up to its end-of-turn token or `max_new_tokens`."""
        import torch

        greedy = temperature <= 0.0
        self.sampling = (max(temperature, 1e-5), top_k, top_p, greedy)
        if seed is not None:
            torch.manual_seed(seed)
        self.out = torch.zeros(self.rows, max_new_tokens, dtype=torch.long, device=self.tokens.device)
        self.done.fill_(True)
        self.counts.zero_()
        self.graph = None
        queue = sorted(prompts, key=lambda p: -len(p.input_ids))  # long prompts first: they also answer longest
        where: dict[int, int] = {}
        answers: dict[int, Answer] = {}
        free = list(range(self.rows))
        config = self.net.config
        saved_attention = config._attn_implementation_internal
        config._attn_implementation_internal = ATTENTION  # this engine's masks and cache, in every layer
        try:
            with torch.inference_mode():
                self._loop(free, queue, processor, max_new_tokens, where, answers, time_steps)
        finally:
            config._attn_implementation_internal = saved_attention
        return [answers[p.index] for p in prompts]

    def _loop(
        self,
        free: list[int],
        queue: list[Prompt],
        processor: Any,
        max_new_tokens: int,
        where: dict[int, int],
        answers: dict[int, Answer],
        time_steps: bool,
    ) -> None:
        self._timed("prefill", time_steps, self._fill, free, queue, processor, max_new_tokens, where)
        if self.graphs and self.graph is None:
            self._timed("capture", time_steps, self._capture)
        while where:
            for _ in range(CHECK_EVERY):
                self.step(time_it=time_steps)
            done = self.done.tolist()
            finished = [row for row in where if done[row]]
            if not finished:
                continue
            counts = self.counts[finished].tolist()
            tokens = self.out[finished].tolist()
            for row, count, row_tokens in zip(finished, counts, tokens, strict=True):
                index = where.pop(row)
                answers[index] = Answer(index, row_tokens[:count])
                free.append(row)
            # Refill once enough rows are free (each prefill is a forward of its own), or when nothing runs.
            if queue and (len(free) >= max(1, self.rows // 8) or not where):
                self._timed("prefill", time_steps, self._fill, free, queue, processor, max_new_tokens, where)

    def _timed(self, phase: str, timed: bool, run: Any, *args: Any) -> None:
        """Run `run(*args)`; when timing, add its wall time, the GPU's work included, to `phase_s[phase]`."""
        import torch

        if not timed:
            run(*args)
            return
        sync = torch.cuda.synchronize if self.tokens.device.type == "cuda" else (lambda: None)
        sync()
        began = time.perf_counter()
        run(*args)
        sync()
        self.phase_s[phase] += time.perf_counter() - began

    def step_times_ms(self) -> list[float]:
        """Milliseconds of each timed step (`run(..., time_steps=True)`), read after the run."""
        return [start.elapsed_time(end) for start, end in self.step_events]


# --------------------------------------------------------------------------------------------- sizing
def cache_length(longest_prompt: int, max_new_tokens: int) -> int:
    return -(-(longest_prompt + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET


def rows_for(model: Any, requests: int, length: int, limit: int = MAX_ROWS) -> int:
    """Rows to decode at once: every request, up to `limit`, within MEMORY_SHARE of the free GPU memory."""
    import torch

    rows = max(1, min(requests, limit))
    param = next(model.parameters())
    if param.device.type != "cuda":
        return rows
    free, _ = torch.cuda.mem_get_info(param.device)
    text = model.model.language_model.config
    per_row = RowCache.bytes_per_row(text, length, param.element_size())
    per_row += 8 * (length + text.vocab_size // 64)  # output buffer, sampling scratch (top-k, logits row)
    fits = int(free * MEMORY_SHARE // per_row)
    if fits < rows:
        log.info("decoding %d rows at once (GPU memory), not %d", fits, rows)
    return max(1, min(rows, fits))


def prompt_ids(processor: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered chat prompts, each image placeholder expanded to the soft tokens the model sees."""
    expanded = [t.replace(processor.image_token, processor.full_image_sequence) for t in texts]
    return [list(ids) for ids in processor.tokenizer(expanded)["input_ids"]]  # as the processor tokenizes


def prepare_model(model: Any) -> None:
    """Once per loaded model: gemma-3n's MLP builds a GPU tensor from a Python number at every call (activation
    sparsity), which a CUDA graph cannot capture; `model.kernels`' `sparsity` computes the same cut-off without it, so
    the engine puts it on whatever the setting says."""
    from mathwizard.models.kernels import apply_kernels

    apply_kernels(model, ["sparsity"])


def decode_all(
    model: Any,
    processor: Any,
    texts: Sequence[str],
    images: Sequence[Any],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int | None,
    seed: int | None,
    eos_ids: Sequence[int],
    graphs: bool,
    rows: int | None = None,
    on_engine: Callable[[RowEngine], None] | None = None,
    time_steps: bool = False,
) -> list[list[int]]:
    """Generated token ids for each rendered prompt in `texts` (with its image), in order."""
    ids = prompt_ids(processor, texts)
    length = cache_length(max(len(i) for i in ids), max_new_tokens)
    rows = rows or rows_for(model, len(ids), length)
    engine = RowEngine(model, rows, length, eos_ids, graphs=graphs)
    if on_engine is not None:
        on_engine(engine)
    prompts = [Prompt(i, p, image) for i, (p, image) in enumerate(zip(ids, images, strict=True))]
    answers = engine.run(
        prompts,
        processor,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        time_steps=time_steps,
    )
    return [a.tokens for a in answers]
