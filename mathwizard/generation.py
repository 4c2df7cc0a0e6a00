"""Batched generation from a vision-language model, shared by flawed-answer sampling, evaluation and `ask`.

Many chat prompts (system text + one image + user text) go through one `model.generate` call, left-padded, so a
GPU samples a whole batch in about the time of one answer; the original sampled one example at a time.
Requests are sorted by length before batching, so similar lengths share a batch and little compute goes to padding.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mathwizard.errors import ConfigError, DataError, ModelError

log = logging.getLogger(__name__)

ImageLike = Any  # PIL.Image.Image, PNG/JPEG bytes, or a datasets Image struct {"bytes": ..., "path": ...}


@dataclass(frozen=True)
class Request:
    """One chat prompt: optional system text, the figure, and the user's text."""

    text: str
    image: ImageLike
    system: str | None = None


@dataclass(frozen=True)
class Completion:
    """A decoded answer and the number of tokens generated for it (up to and including its end-of-turn token)."""

    text: str
    tokens: int


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; temperature 0 means greedy decoding."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Generator(Protocol):
    """Anything that turns requests into completions, in order (a model, or a fake in tests)."""

    def __call__(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]: ...


# ------------------------------------------------------------------------------------------------ images
def to_pil(image: ImageLike) -> Any:
    """An RGB PIL image from a PIL image, encoded bytes or a datasets Image struct."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, dict):
        if image.get("bytes"):
            image = image["bytes"]
        elif image.get("path"):
            image = Path(image["path"]).read_bytes()
        else:
            raise DataError("image struct has neither bytes nor path")
    if isinstance(image, bytes | bytearray):
        with Image.open(io.BytesIO(image)) as opened:
            return opened.convert("RGB")
    raise DataError(f"cannot use {type(image).__name__} as an image")


def chat_messages(request: Request) -> list[dict[str, Any]]:
    """The chat turns for one request; gemma-3n's template merges the system text into the first user turn."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request.text}]})
    return messages


# ------------------------------------------------------------------------------------------------ model
def _eos_ids(model: Any, processor: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])
    tokenizer = processor.tokenizer
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return ids


CACHE_BUCKET = 512  # compiled decoding: the static KV cache grows in steps of this many tokens, so shapes repeat


def resolve_decode(decode: str, backend: str = "hf", model: Any = None) -> str:
    """'graphs', 'compiled' or 'eager' for `decode` (auto | eager | compiled | graphs) with the model's `backend`, and
    once it is loaded, the `model` itself.

    auto is graphs (`mathwizard.decoding`: per-row KV cache, finished rows refilled): on CUDA the decode step is one
    CUDA graph, 58-73x eager's rate on the H200 with no compile time, where compiled reached 2-5x eager's on the H100
    after minutes of compiling (benchmarks/RESULTS.md); on a CPU the same engine runs without the graph, 1.10x
    generate's rate, and the offline demo's pairs stage took 52 s against 64 s. Given a `model` the engine does not
    support (not gemma-3n), auto is eager.

    Raises:
        ConfigError: an unknown mode, or compiled with the Unsloth backend.
    """
    if decode not in ("auto", "eager", "compiled", "graphs"):
        raise ConfigError(f"model.decode must be auto, eager, compiled or graphs, got {decode!r}")
    if decode == "compiled" and backend == "unsloth":
        raise ConfigError(
            "model.decode: compiled does not work with model.backend: unsloth (Unsloth's compiled gemma-3n forward sets"
            " torch.compile's stance inside the graph); set model.decode: graphs or eager, or model.backend: hf"
        )
    if decode != "auto":
        return decode
    if model is not None:
        from mathwizard import decoding

        if not decoding.supports(model):
            return "eager"
    return "graphs"


def _needs_autocast(model: Any) -> bool:
    """Whether a half-precision model keeps some float32 weights (Unsloth's gemma-3n norms, unless `model.kernels`
    has `uniform_dtype`): then only autocast reconciles them with half-precision activations. A uniform model runs
    without it, since autocast would leave some outputs float32 and a static KV cache then holds mixed dtypes."""
    import torch

    cached = getattr(model, "_mathwizard_needs_autocast", None)
    if cached is None:
        half = model.dtype in (torch.bfloat16, torch.float16)
        cached = half and any(p.dtype == torch.float32 for p in model.parameters())
        model._mathwizard_needs_autocast = cached
    return cached


def _compiled_decode_kwargs(model: Any, prompt_length: int, max_new_tokens: int) -> dict[str, Any]:
    """generate() arguments for a static KV cache and a compiled decode step (transformers' auto-compile).

    The cache length is rounded up to a multiple of CACHE_BUCKET (transformers keeps the largest it has seen), so
    batches of different prompt lengths reuse one compiled graph instead of compiling their own.
    """
    from transformers import CompileConfig

    cuda = model.device.type == "cuda"
    # reduce-overhead = CUDA graphs: one graph launch per decode step instead of thousands of small kernels.
    config = CompileConfig(fullgraph=False, dynamic=None, mode="reduce-overhead" if cuda else "default")
    config._compile_all_devices = True  # transformers compiles on CUDA by itself; elsewhere only when asked (tests)
    needed = prompt_length + max_new_tokens
    return {
        "cache_implementation": "static",
        "max_cache_len": -(-needed // CACHE_BUCKET) * CACHE_BUCKET,
        "compile_config": config,
    }


def generate_batch(
    model: Any,
    processor: Any,
    requests: Sequence[Request],
    params: SamplingParams,
    *,
    streamer: Any = None,
    compiled: bool = False,
) -> list[Completion]:
    """One `model.generate` call over all `requests` (left padding); a streamer needs a single request.

    `compiled`: decode with a static KV cache and a torch.compiled step (see `resolve_decode`).

    Always transformers' own `generate`: Unsloth replaces `model.generate` with a wrapper that forces its own static
    cache on gemma-3n (which broke on the tiny model on an H100). On CUDA a model with mixed float32/half weights
    (Unsloth's) runs under autocast to its dtype. Inference models are merged (no PEFT wrapper), so the class's
    generate is the whole model's.
    """
    import torch

    if not requests:
        return []
    if streamer is not None and len(requests) != 1:
        raise ValueError("a streamer can follow only one request at a time")
    tokenizer = processor.tokenizer
    # Decoder-only generation appends to the right end of every row, so the padding must sit on the left.
    tokenizer.padding_side = "left"
    texts = [
        processor.apply_chat_template(chat_messages(r), add_generation_prompt=True, tokenize=False) for r in requests
    ]
    images = [[to_pil(r.image)] for r in requests]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    inputs = inputs.to(model.device, dtype=model.dtype)
    eos_ids = _eos_ids(model, processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "do_sample": not params.greedy,
        "eos_token_id": sorted(eos_ids),
        "pad_token_id": pad_id,
    }
    if params.greedy:
        # Clear sampling defaults a checkpoint may carry, so greedy decoding stays greedy without warnings.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    else:
        # top_k stays the checkpoint's own (gemma-3n: 64), as in the original sampling script.
        kwargs.update(temperature=params.temperature, top_p=params.top_p)
    if compiled:
        kwargs.update(_compiled_decode_kwargs(model, inputs["input_ids"].shape[1], params.max_new_tokens))
    generate = type(model).generate.__get__(model)  # the class's, never an instance attribute set over it
    autocast = torch.autocast(
        device_type=model.device.type, dtype=model.dtype, enabled=model.device.type == "cuda" and _needs_autocast(model)
    )
    if params.seed is not None:
        torch.manual_seed(params.seed)
    with torch.inference_mode(), autocast:
        output = generate(**inputs, **kwargs, streamer=streamer)
    new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
    completions = []
    for row in new_tokens:
        length = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        text = tokenizer.decode(row[:length], skip_special_tokens=True)
        completions.append(Completion(text=text.strip(), tokens=length))
    return completions


@dataclass
class ModelGenerator:
    """A loaded model + processor that answers requests in batches of `batch_size` prompts per generate call."""

    model: Any
    processor: Any
    batch_size: int = 16
    name: str = ""
    decode: str = "eager"  # eager | compiled | graphs (see resolve_decode)
    generate_calls: int = field(default=0, init=False)
    generated_tokens: int = field(default=0, init=False)
    seconds: float = field(default=0.0, init=False)

    def __call__(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        if not requests:
            return []
        if self.decode == "graphs":
            from mathwizard import decoding

            if decoding.supports(self.model):
                try:
                    return self._decode_rows(requests, params)
                except Exception as exc:  # the fast path must never cost a run its answers: plain generate takes over
                    log.warning("model.decode=graphs failed (%s: %s); decoding eagerly", type(exc).__name__, exc)
            else:
                log.warning("model.decode=graphs supports gemma-3n only; %s decodes eagerly", type(self.model).__name__)
            self.decode = "eager"
        # Similar lengths share a batch (less padding); results go back in the caller's order.
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].text) + len(requests[i].system or ""))
        results: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            seed = None if params.seed is None else params.seed + start
            batch_params = SamplingParams(params.max_new_tokens, params.temperature, params.top_p, seed)
            chunk = [requests[i] for i in batch]
            compiled = self.decode == "compiled"
            if compiled:  # a short batch is filled with copies: a new batch size would compile the step again
                chunk += [chunk[-1]] * (self.batch_size - len(chunk))
            started = time.perf_counter()
            completions = generate_batch(self.model, self.processor, chunk, batch_params, compiled=compiled)
            completions = completions[: len(batch)]
            self.seconds += time.perf_counter() - started
            self.generate_calls += 1
            self.generated_tokens += sum(c.tokens for c in completions)
            for i, completion in zip(batch, completions, strict=True):
                results[i] = completion
        return [c for c in results if c is not None]

    def _decode_rows(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        """All requests through `mathwizard.decoding` (rows refilled as answers end; CUDA graph on a GPU).

        On CUDA the engine sizes its rows from free GPU memory; elsewhere there is no such measure, so `batch_size`
        bounds the rows in flight, as it bounds eager's batches."""
        import torch

        from mathwizard import decoding

        model, processor = self.model, self.processor
        render = processor.apply_chat_template
        texts = [render(chat_messages(r), add_generation_prompt=True, tokenize=False) for r in requests]
        eos_ids = _eos_ids(model, processor)
        autocast = torch.autocast(
            device_type=model.device.type,
            dtype=model.dtype,
            enabled=model.device.type == "cuda" and _needs_autocast(model),
        )
        if not getattr(model, "_mathwizard_rows_ready", False):
            decoding.prepare_model(model)
            model._mathwizard_rows_ready = True
        started = time.perf_counter()
        with autocast:
            answers = decoding.decode_all(
                model,
                processor,
                texts,
                [r.image for r in requests],
                max_new_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=None if params.greedy else _top_k(model),
                seed=params.seed,
                eos_ids=sorted(eos_ids),
                graphs=model.device.type == "cuda",
                rows=None if model.device.type == "cuda" else min(len(requests), self.batch_size),
            )
        self.seconds += time.perf_counter() - started
        self.generate_calls += 1
        completions = []
        for tokens in answers:
            length = next((i + 1 for i, token in enumerate(tokens) if token in eos_ids), len(tokens))
            text = processor.tokenizer.decode(tokens[:length], skip_special_tokens=True)
            completions.append(Completion(text=text.strip(), tokens=length))
        self.generated_tokens += sum(c.tokens for c in completions)
        return completions

    def stream(self, request: Request, params: SamplingParams, on_text: Callable[[str], None]) -> Completion:
        """Answer one request, handing text to `on_text` as soon as whole words are decoded."""
        streamer = _callback_streamer(self.processor.tokenizer, on_text)
        started = time.perf_counter()
        (completion,) = generate_batch(self.model, self.processor, [request], params, streamer=streamer)
        self.seconds += time.perf_counter() - started
        self.generate_calls += 1
        self.generated_tokens += completion.tokens
        return completion


def _top_k(model: Any) -> int | None:
    """The top-k that `generate` samples with: the checkpoint's, else transformers' default (50)."""
    from transformers import GenerationConfig

    top_k = getattr(model.generation_config, "top_k", None)
    return top_k if top_k is not None else GenerationConfig._get_default_generation_params().get("top_k")


def _callback_streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    from transformers import TextStreamer

    class _CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return _CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def load_generator(
    name_or_dir: str | Path,
    *,
    backend: str = "auto",
    dtype: str = "auto",
    load_in_4bit: bool = False,
    batch_size: int = 16,
    decode: str = "eager",
    kernels: Sequence[str] = (),
) -> ModelGenerator:
    """Load a model for inference (a Hub id, a model dir, `tiny`, or a stage folder / its adapter) in eval mode;
    `decode` (auto | eager | compiled | graphs) picks how batches decode (see `resolve_decode`).

    Raises:
        ConfigError: an unknown `decode`, or compiled decoding with the Unsloth backend (before anything loads).
        ModelError: the model cannot be found or loaded.
    """
    from mathwizard.models import load_model, resolve_backend
    from mathwizard.models.ref import resolve

    location = resolve(name_or_dir).location
    resolve_decode(decode, resolve_backend(backend))  # a bad setting fails before minutes of loading
    try:
        model, processor = load_model(
            location, backend, for_training=False, dtype=dtype, load_in_4bit=load_in_4bit, kernels=kernels
        )
    except ModelError:
        raise
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ModelError(f"cannot load model {location!r}: {reason}") from None
    model.eval()
    mode = resolve_decode(decode, resolve_backend(backend), model)
    shown = "row engine without CUDA graphs" if mode == "graphs" and model.device.type != "cuda" else mode
    log.info("loaded %s for generation on %s (%s decoding)", location, model.device, shown)
    return ModelGenerator(model=model, processor=processor, batch_size=batch_size, name=str(name_or_dir), decode=mode)


ANSWER_TOKENS_CAP = 1024  # the original scripts' max_new_tokens


def answer_budget(texts: Sequence[str], generator: Generator, *, cap: int = ANSWER_TOKENS_CAP) -> int:
    """A new-token budget for answers like `texts`: 1.5 times the longest, in the generator's tokens, rounded up to
    64, at most `cap`. A model's answer to the same problem rarely runs longer; one that never stops (a random demo
    model) costs a budget sized to the data, not the cap. Without a tokenizer (a fake generator), the cap."""
    processor = getattr(generator, "processor", None)
    if processor is None or not texts:
        return cap
    longest = max(len(ids) for ids in processor.tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    return max(64, min(cap, -(-int(1.5 * longest) // 64) * 64))
