"""The row engine (`model.decode: graphs`) against transformers' generate, on the CPU with tiny gemma-3n models."""

from __future__ import annotations

from typing import Any

import pytest

from mathwizard import decoding
from mathwizard.generation import (
    ModelGenerator,
    Request,
    SamplingParams,
    _eos_ids,
    chat_messages,
    generate_batch,
)
from tests.training.builders import png


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    import torch

    from mathwizard.models import load_model
    from tests.training.builders import use_session_model_cache

    use_session_model_cache(tmp_path_factory)
    torch.set_num_threads(1)
    model, processor = load_model("tiny", "hf", for_training=False)
    return model.eval(), processor


@pytest.fixture(scope="module")
def shared_kv(tiny: tuple[Any, Any]) -> Any:
    """A tiny gemma-3n with E2B's less common parts: KV-shared layers, activation sparsity, 4 AltUp streams, and a
    24-token sliding window that every prompt here outgrows (so the ring of the sliding layers wraps)."""
    import torch
    from transformers import Gemma3nForConditionalGeneration, Gemma3nTextConfig

    from mathwizard.models.tiny import register_timm_architectures, tiny_config

    register_timm_architectures()
    config = tiny_config()
    text = config.text_config.to_dict()
    for key in ("model_type", "transformers_version"):
        text.pop(key, None)
    kinds = ["sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    text.update(
        num_hidden_layers=5,
        layer_types=kinds,
        num_kv_shared_layers=2,
        sliding_window=24,
        activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0],
        intermediate_size=[128] * 5,
        altup_num_inputs=4,
    )
    config.text_config = Gemma3nTextConfig(**text)
    torch.manual_seed(0)
    return Gemma3nForConditionalGeneration(config).eval()


def _requests(n: int) -> list[Request]:
    # Prompt lengths from ~50 to ~250 tokens: longer than both models' sliding windows for most of them.
    texts = [f"Find angle {chr(65 + i)}. " * (5 * i + 1) for i in range(n)]
    return [Request(text=text, image=png(i), system="Be brief.") for i, text in enumerate(texts)]


def _render(processor: Any, requests: list[Request]) -> list[str]:
    render = processor.apply_chat_template
    return [render(chat_messages(r), add_generation_prompt=True, tokenize=False) for r in requests]


def _engine_answers(
    model: Any, processor: Any, requests: list[Request], new: int, rows: int, engines: list | None = None, **sampling
):
    texts = _render(processor, requests)
    decoding.prepare_model(model)
    tokens = decoding.decode_all(
        model,
        processor,
        texts,
        [r.image for r in requests],
        max_new_tokens=new,
        eos_ids=sorted(_eos_ids(model, processor)),
        graphs=False,
        rows=rows,
        on_engine=None if engines is None else engines.append,
        time_steps=engines is not None,
        **{"temperature": 0.0, "top_p": 1.0, "top_k": None, "seed": 0, **sampling},
    )
    return [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def test_prompt_ids_are_the_processors(tiny: tuple[Any, Any]) -> None:
    from mathwizard.generation import to_pil

    _, processor = tiny
    requests = _requests(3)
    texts = _render(processor, requests)
    batch = processor(text=texts, images=[[to_pil(r.image)] for r in requests], padding=True)
    pairs = zip(batch["input_ids"], batch["attention_mask"], strict=True)
    expected = [[t for t, m in zip(ids, mask, strict=True) if m] for ids, mask in pairs]
    assert decoding.prompt_ids(processor, texts) == expected


def test_greedy_answers_match_generate_with_rows_refilled(tiny: tuple[Any, Any]) -> None:
    model, processor = tiny
    requests = _requests(5)
    expected = [c.text for c in generate_batch(model, processor, requests, SamplingParams(max_new_tokens=40))]
    # 2 rows for 5 requests: three prompts are prefilled into rows that another answer just left.
    assert _engine_answers(model, processor, requests, 40, rows=2) == expected
    engines: list = []  # timed as the benchmark times it: the same answers, the prefills' wall time counted
    assert _engine_answers(model, processor, requests, 40, rows=2, engines=engines) == expected
    assert engines[0].phase_s["prefill"] > 0 and engines[0].phase_s["capture"] == 0  # no graph on a CPU
    assert len(engines[0].step_times_ms()) == 0  # CUDA events only


def test_greedy_answers_match_generate_with_kv_sharing_sparsity_and_a_wrapping_window(
    tiny: tuple[Any, Any], shared_kv: Any
) -> None:
    _, processor = tiny
    requests = _requests(6)
    expected = [c.text for c in generate_batch(shared_kv, processor, requests, SamplingParams(max_new_tokens=30))]
    assert _engine_answers(shared_kv, processor, requests, 30, rows=4) == expected


def test_the_model_generator_decodes_with_the_engine_and_counts_tokens(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, processor = tiny
    requests = _requests(4)
    params = SamplingParams(max_new_tokens=12)
    eager = ModelGenerator(model=model, processor=processor, batch_size=2, decode="eager")(requests, params)
    engines: list[decoding.RowEngine] = []
    monkeypatch.setattr(decoding, "decode_all", _recording_engines(decoding.decode_all, engines))
    rows = ModelGenerator(model=model, processor=processor, batch_size=2, decode="graphs")
    assert rows(requests, params) == eager
    assert rows.decode == "graphs" and rows.generate_calls == 1  # one engine call for the four requests
    assert [engine.rows for engine in engines] == [2]  # on a CPU, batch_size rows in flight, refilled as they end


def _recording_engines(decode_all: Any, engines: list[Any]) -> Any:
    def spy(*args: Any, **kwargs: Any) -> Any:
        return decode_all(*args, **kwargs, on_engine=engines.append)

    return spy


def test_auto_decodes_gemma_3n_with_the_engine_and_other_models_with_generate(tiny: tuple[Any, Any]) -> None:
    import torch

    from mathwizard.generation import resolve_decode

    model, _ = tiny
    assert resolve_decode("auto", "hf", model) == "graphs"
    assert resolve_decode("auto", "hf", torch.nn.Linear(2, 2)) == "eager"  # the engine is gemma-3n's alone
    assert resolve_decode("graphs", "hf", torch.nn.Linear(2, 2)) == "graphs"  # asked for: tried, then falls back


def test_sampling_draws_from_the_same_distribution_as_transformers_warpers() -> None:
    """temperature -> top-k -> top-p -> multinomial (transformers) vs top-p inside top-k + Gumbel-max (the engine)."""
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 3
    warped = TopPLogitsWarper(0.95)(None, TopKLogitsWarper(64)(None, TemperatureLogitsWarper(0.7)(None, logits)))
    expected = warped.softmax(-1)
    draws = torch.stack([decoding.sample_next(logits, 0.7, 64, 0.95, False) for _ in range(6000)])
    for row in range(3):
        seen = torch.bincount(draws[:, row], minlength=500).float() / len(draws)
        assert seen[expected[row] == 0].sum() == 0  # never outside the top-p set
        assert (seen - expected[row]).abs().max() < 0.03  # 6,000 draws: sampling noise is below 0.01
    assert torch.equal(decoding.sample_next(logits, 1.0, None, 1.0, True), logits.argmax(-1))


def test_the_decode_step_makes_no_host_copies_or_syncs(tiny: tuple[Any, Any], shared_kv: Any) -> None:
    """What a CUDA graph cannot capture, seen on the CPU: a tensor made from a Python number (gemma-3n's activation
    sparsity does it every call, until `prepare_model`) or a value read back to the host."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    _, processor = tiny
    forbidden = {"aten.lift_fresh.default", "aten._local_scalar_dense.default", "aten.nonzero.default"}

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    def step_ops(model: Any) -> set[str]:
        engine = decoding.RowEngine(model, rows=2, length=512, eos_ids=[1], graphs=False)
        texts = _render(processor, _requests(1))
        prompt = decoding.Prompt(0, decoding.prompt_ids(processor, texts)[0], png(0))
        engine.out = torch.zeros(2, 8, dtype=torch.long)
        saved = engine.net.config._attn_implementation_internal
        engine.net.config._attn_implementation_internal = decoding.ATTENTION
        try:
            with torch.inference_mode():
                engine._prefill([0], [prompt], processor, [8])
                with Ops() as ops:
                    engine._step()
        finally:
            engine.net.config._attn_implementation_internal = saved
        return ops.seen & forbidden

    fresh = shared_kv.__class__(shared_kv.config).eval()  # not yet prepared: its MLPs build tensors per call
    assert "aten.lift_fresh.default" in step_ops(fresh)
    decoding.prepare_model(fresh)
    assert step_ops(fresh) == set()


def test_float32_states_of_a_mixed_precision_model_go_into_a_bf16_cache() -> None:
    """Unsloth keeps some gemma-3n modules in float32 inside a bf16 model, so attention can hand the cache float32
    keys and values (on the H200 this broke the engine until the cache cast what it stores)."""
    import torch
    from transformers import Gemma3nTextConfig

    text = Gemma3nTextConfig(
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        num_kv_shared_layers=0,
        num_key_value_heads=1,
        num_attention_heads=2,
        head_dim=4,
        sliding_window=8,
        intermediate_size=[8, 8],
        activation_sparsity_pattern=[0.0, 0.0],
    )
    cache = decoding.RowCache(text, rows=2, length=16, device="cpu", dtype=torch.bfloat16)
    lengths = torch.tensor([3, 5])
    cache.prefill = {"rows": torch.tensor([0, 1]), **decoding.prefill_slots(lengths, 5, 16, 8)}
    fresh = torch.randn(2, 1, 5, 4)  # float32
    assert cache.update(fresh, fresh, 1)[0] is fresh  # prefill attends over the fresh states
    assert torch.equal(cache.keys[1][1, :, :5], fresh[1].to(torch.bfloat16))
    cache.prefill = None
    cache.decode_slots = {"full_attention": lengths, "sliding_attention": lengths % 8}
    step = torch.randn(2, 1, 1, 4)
    keys, values = cache.update(step, step, 1)
    assert keys.dtype == torch.bfloat16 and torch.equal(keys[0, :, 3], step[0, :, 0].to(torch.bfloat16))
    query = torch.randn(2, 2, 1, 4)  # float32 query against the bf16 cache
    valid = decoding.decode_lengths(lengths, 16, 8)["full_attention"]
    out, _ = decoding.rows_attention(None, query, keys, values, valid, scaling=1.0)
    assert out.shape == (2, 1, 2, 4) and torch.isfinite(out.float()).all()
