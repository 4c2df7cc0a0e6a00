"""Batched generation: left padding, batch splitting, order, token counts, streaming, images and inputs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mathwizard.errors import ConfigError, DataError
from mathwizard.generation import (
    ModelGenerator,
    Request,
    SamplingParams,
    chat_messages,
    generate_batch,
    to_pil,
)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny():
    import torch

    torch.set_num_threads(1)
    from mathwizard.generation import load_generator

    return load_generator("tiny", batch_size=4)


def _requests(n: int) -> list[Request]:
    # Question lengths differ a lot, so a batch needs padding.
    return [
        Request(text="Find angle ABC. " + "AB = AC. " * (3 * i), image=_png((30 * i, 0, 0)), system="Be brief.")
        for i in range(n)
    ]


def test_batched_greedy_equals_one_at_a_time(tiny: ModelGenerator) -> None:
    """Left padding + attention mask: a prompt's greedy answer does not depend on its batch neighbours."""
    requests, params = _requests(5), SamplingParams(max_new_tokens=12)
    batched = tiny(requests, params)
    single = [tiny([r], params)[0] for r in requests]
    assert batched == single
    assert tiny.processor.tokenizer.padding_side == "left"


def test_batches_split_by_batch_size_and_keep_order(tiny: ModelGenerator) -> None:
    calls_before = tiny.generate_calls
    requests = _requests(5)
    results = tiny(requests, SamplingParams(max_new_tokens=6))
    assert tiny.generate_calls - calls_before == 2  # ceil(5 / batch_size 4)
    # Sorting by length for batching must not reorder results: each equals its own single-request answer.
    assert results[4] == tiny([requests[4]], SamplingParams(max_new_tokens=6))[0]
    assert all(1 <= c.tokens <= 6 for c in results)


def test_one_generate_call_carries_the_whole_batch(tiny: ModelGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    original = type(tiny.model).generate

    def spy(self, **kwargs):
        seen.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(type(tiny.model), "generate", spy)
    generate_batch(tiny.model, tiny.processor, _requests(3), SamplingParams(8, temperature=1.0, top_p=0.95, seed=3))
    (kwargs,) = seen
    assert kwargs["input_ids"].shape[0] == 3 and kwargs["pixel_values"].shape[0] == 3
    mask = kwargs["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # padding on the left: every row ends with real tokens
    assert (kwargs["do_sample"], kwargs["temperature"], kwargs["top_p"], kwargs["max_new_tokens"]) == (
        True,
        1.0,
        0.95,
        8,
    )


def test_sampling_is_reproducible_with_a_seed(tiny: ModelGenerator) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7)
    assert tiny(_requests(3), params) == tiny(_requests(3), params)


def test_token_count_stops_at_end_of_turn(tiny: ModelGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    tokenizer = tiny.processor.tokenizer
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    word = tokenizer.convert_tokens_to_ids("<0x41>")  # the byte "A"

    def fake_generate(self, **kwargs):
        prompt = kwargs["input_ids"]
        new = torch.tensor([[word, word, eot, 0, 0], [word, word, word, word, word]])
        return torch.cat([prompt, new], dim=1)

    monkeypatch.setattr(type(tiny.model), "generate", fake_generate)
    first, second = generate_batch(tiny.model, tiny.processor, _requests(2), SamplingParams(5))
    assert (first.text, first.tokens) == ("AA", 3)  # two letters + the end-of-turn token
    assert (second.text, second.tokens) == ("AAAAA", 5)  # ran out of budget


def test_stream_hands_over_the_same_text(tiny: ModelGenerator) -> None:
    pieces: list[str] = []
    completion = tiny.stream(_requests(1)[0], SamplingParams(max_new_tokens=16), pieces.append)
    assert pieces and "".join(pieces).strip() == completion.text
    with pytest.raises(ValueError, match="one request"):
        generate_batch(tiny.model, tiny.processor, _requests(2), SamplingParams(4), streamer=object())


def test_chat_messages_put_system_then_image_then_text() -> None:
    messages = chat_messages(Request(text="Q?", image=None, system="S"))
    assert [m["role"] for m in messages] == ["system", "user"]
    assert [item["type"] for item in messages[1]["content"]] == ["image", "text"]
    assert [m["role"] for m in chat_messages(Request(text="Q?", image=None))] == ["user"]


def test_to_pil_accepts_bytes_structs_and_images(tmp_path: Path) -> None:
    from PIL import Image

    data = _png((1, 2, 3))
    (tmp_path / "f.png").write_bytes(data)
    for image in (data, {"bytes": data, "path": None}, {"bytes": None, "path": str(tmp_path / "f.png")}):
        assert to_pil(image).getpixel((0, 0)) == (1, 2, 3)
    assert to_pil(Image.new("L", (4, 4))).mode == "RGB"
    with pytest.raises(DataError, match="neither bytes nor path"):
        to_pil({"bytes": None, "path": None})
    with pytest.raises(DataError, match="cannot use int"):
        to_pil(3)


def test_decode_mode_auto_is_the_row_engine_and_never_compiled_with_unsloth() -> None:
    from mathwizard.generation import resolve_decode

    assert resolve_decode("auto", "hf") == resolve_decode("auto", "unsloth") == "graphs"  # CUDA graphs on CUDA only
    assert resolve_decode("compiled", "hf") == "compiled"
    assert resolve_decode("graphs", "unsloth") == "graphs"
    assert resolve_decode("eager", "unsloth") == "eager"
    with pytest.raises(ConfigError, match=r"set model\.decode: graphs or eager"):
        resolve_decode("compiled", "unsloth")
    with pytest.raises(ConfigError, match="auto, eager, compiled or graphs"):
        resolve_decode("fast")


def test_autocast_only_for_a_half_model_with_float32_weights() -> None:
    """Unsloth keeps gemma-3n's vision convolutions float32 in a bf16 model: autocast reconciles them. A uniform
    model runs without autocast, which would leave some outputs float32 beside a bf16 static KV cache."""
    import torch

    from mathwizard.generation import _needs_autocast

    class Model(torch.nn.Module):
        def __init__(self, *dtypes: torch.dtype) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2, dtype=d) for d in dtypes)

        @property
        def dtype(self) -> torch.dtype:
            return next(self.parameters()).dtype

    assert _needs_autocast(Model(torch.bfloat16, torch.float32))
    assert not _needs_autocast(Model(torch.bfloat16, torch.bfloat16))
    assert not _needs_autocast(Model(torch.float32, torch.float32))


@pytest.mark.slow  # torch.compile on the CPU (~14 s); `compiled` is superseded by `graphs` on CUDA, never a default
def test_compiled_decoding_answers_like_eager_and_compiles_once(tiny: ModelGenerator) -> None:
    """Static cache + torch.compile (inductor on CPU here; CUDA graphs on a GPU): the same greedy answers, and a
    second call with other prompt lengths, a short tail batch and another max_new_tokens compiles nothing new."""
    import torch._dynamo

    compiled = ModelGenerator(model=tiny.model, processor=tiny.processor, batch_size=4, decode="compiled")
    requests = _requests(5)  # batches of 4 + 1; the 1 is filled up to 4, so both share one batch size
    eager = tiny(requests, SamplingParams(max_new_tokens=10))
    assert compiled(requests, SamplingParams(max_new_tokens=10)) == eager
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1  # it really compiled

    other = [Request(text="Find x. " * (i + 1), image=_png((0, 40 * i, 0)), system="Be brief.") for i in range(3)]
    answers = compiled(other, SamplingParams(max_new_tokens=16))  # prompt + 16 new tokens stay in the 512 bucket
    assert answers == tiny(other, SamplingParams(max_new_tokens=16))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert compiled.generate_calls == 3  # 2 batches, then 1


def test_generation_uses_transformers_generate_not_an_instance_wrapper(tiny: ModelGenerator) -> None:
    """Unsloth swaps `model.generate` for its own wrapper (its cache choices broke on an H100); the project calls
    transformers' generate of the model's class, so a replaced instance attribute is never used."""

    def wrapper(*_: object, **__: object) -> None:
        raise AssertionError("the instance's generate wrapper was called")

    tiny.model.generate = wrapper
    try:
        (answer,) = generate_batch(tiny.model, tiny.processor, _requests(1), SamplingParams(max_new_tokens=4))
    finally:
        del tiny.model.generate
    assert 1 <= answer.tokens <= 4
