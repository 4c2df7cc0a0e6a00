"""`model.kernels: vision_cache`: the frozen vision tower's output kept per figure for the training stages.

What must hold: the model computes exactly what it computes without the cache (loss, logits, every gradient), a
figure is computed once however often it recurs (within a batch, across steps, in DPO's reference pass, in later
loads of the same tower in the process), a figure's key changes with any pixel, the cache follows the tower's
weights, and it stands aside where it would change the function (a trainable or stochastic tower, another call form,
another tower) or waste memory (an inference load with nothing computed before it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathwizard.config import DPOConfig, ModelConfig, SFTConfig
from mathwizard.models.kernels import (
    VISION_CLASS,
    FigureCache,
    apply_kernels,
    clear_figure_cache,
    figure_cache,
    figure_keys,
    forget_figures,
    remove_kernels,
    tower_fingerprint,
)


@pytest.fixture(autouse=True)
def no_figures_known():
    """The figures belong to the process: each test starts and ends without any."""
    forget_figures()
    yield
    forget_figures()


@pytest.fixture(scope="module")
def tiny():
    """The tiny model for training (float32, CPU) with its vision tower frozen, as LoRA leaves it, and a batch maker
    over three figures (left-padded)."""
    import torch
    from PIL import Image

    from mathwizard.models import load_model

    torch.set_num_threads(1)
    model, processor = load_model("tiny", "hf", for_training=True)
    model.model.vision_tower.requires_grad_(False)
    model.set_attn_implementation({"text_config": "eager"})  # SDPA gives a left-padding row NaN (test_kernels.py)
    figures = [Image.new("RGB", (50 + 10 * i, 40), (60 * i, 90, 200)) for i in range(3)]

    def batch(*which: int) -> dict:
        conversations = [
            [
                {"role": "user", "content": [{"type": "image", "image": figures[i]}, {"type": "text", "text": "x?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"x = {i}"}]},
            ]
            for i in which
        ]
        out = processor.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_tensors="pt", padding=True
        )
        out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return out

    return model, batch


def _step(model, batch) -> tuple:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def _assert_same(got: tuple, want: tuple, exact: bool = True) -> None:
    """Equal; or, where the cached figure was computed in a batch of another size (whose convolutions may sum in
    another order), equal up to rounding: every difference within 0.1 % of the largest value. A wrong figure gives
    differences of the values' own size."""
    import torch

    assert got[2].keys() == want[2].keys() and len(want[2]) > 50
    for a, b, name in [(got[0], want[0], "loss"), (got[1], want[1], "logits")] + [
        (got[2][name], grad, name) for name, grad in want[2].items()
    ]:
        if exact:
            assert torch.equal(a, b), name
        else:
            assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item() + 1e-7, name


def test_figures_are_computed_once_and_the_model_computes_what_it_computes_without_the_cache(tiny) -> None:
    model, batch = tiny
    remove_kernels(model)
    first, again, repeated = batch(0, 1), batch(1, 0), batch(2, 2)
    want = [_step(model, b) for b in (first, first, again, repeated)]

    assert apply_kernels(model, ["vision_cache"]) == {"vision_cache": 1}
    cache = figure_cache(model)
    got = [_step(model, b) for b in (first, first, again, repeated)]
    remove_kernels(model)

    for g, w in zip(got[:3], want[:3], strict=True):
        _assert_same(g, w)  # the figures of the first batch, read back in that batch and in another order
    _assert_same(got[3], want[3], exact=False)  # figure 2 computed alone, then used twice
    # 0 and 1 computed in the first batch, then read twice each; figure 2 twice in one batch: computed once
    assert (cache.misses, cache.hits, len(cache.features)) == (3, 5, 3)
    assert figure_cache(model) is None and "forward" not in vars(model.model.vision_tower)


def test_a_trainable_tower_and_other_call_forms_go_to_the_tower_unchanged(tiny) -> None:
    import torch

    model, batch = tiny
    remove_kernels(model)
    apply_kernels(model, ["vision_cache"])
    tower, cache = model.model.vision_tower, figure_cache(model)
    pixels = batch(0)["pixel_values"]
    as_tuple = tower(pixel_values=pixels, do_pooling=False, return_dict=False)
    assert isinstance(as_tuple, tuple) and cache.misses == cache.hits == 0

    weight = next(tower.parameters())
    weight.requires_grad_(True)
    try:
        out = tower(pixel_values=pixels, do_pooling=False, return_dict=True)
        assert out.last_hidden_state.requires_grad and cache.misses == cache.hits == 0
    finally:
        weight.requires_grad_(False)
        remove_kernels(model)
    assert type(tower).__name__ == VISION_CLASS and torch.is_tensor(out.last_hidden_state)


def test_a_figures_key_follows_its_pixels_not_its_place_in_the_batch() -> None:
    import torch

    torch.manual_seed(0)
    figures = torch.randn(3, 3, 8, 8)
    keys = figure_keys(figures)
    assert len(set(keys)) == 3
    assert figure_keys(figures[[2, 0]]) == [keys[2], keys[0]]
    assert figure_keys(figures[1:2].clone()) == [keys[1]]
    touched = figures.clone()
    touched[1, 2, 7, 7] = torch.nextafter(touched[1, 2, 7, 7], torch.tensor(1e9))  # one pixel, one ulp
    assert figure_keys(touched) == [keys[0], figure_keys(touched)[1], keys[2]] and figure_keys(touched)[1] != keys[1]
    assert figure_keys(figures.to(torch.bfloat16))[0] != keys[0]  # dtype is part of the key


def test_a_full_cache_keeps_what_it_holds_and_computes_the_rest(tiny) -> None:
    import torch

    model, batch = tiny
    remove_kernels(model)
    want = _step(model, batch(0, 1))
    apply_kernels(model, ["vision_cache"])
    tower = model.model.vision_tower
    one = tower(pixel_values=batch(0)["pixel_values"], do_pooling=False, return_dict=True).last_hidden_state
    vars(tower)["_mathwizard_figures"] = cache = FigureCache(max_bytes=one.numel() * one.element_size())
    try:
        _assert_same(_step(model, batch(0, 1)), want)
        _assert_same(_step(model, batch(0, 1)), want, exact=False)  # figure 1 computed alone this time
        assert len(cache.features) == 1 and cache.bytes == cache.max_bytes
        assert (cache.misses, cache.hits) == (3, 1)  # figure 1 did not fit: computed both times
        assert clear_figure_cache(model) == 1 and cache.bytes == 0 and not cache.features
    finally:
        remove_kernels(model)
    assert torch.is_tensor(one)


def test_a_stochastic_tower_is_left_alone(tiny, caplog) -> None:
    import torch

    model, _ = tiny
    remove_kernels(model)
    dropout = next(m for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.Dropout))
    dropout.p = 0.1
    try:
        assert apply_kernels(model, ["vision_cache"]) == {"vision_cache": 0}
    finally:
        dropout.p = 0.0
    assert "Dropout in the vision tower" in caplog.text and figure_cache(model) is None


def test_only_inference_loads_get_the_sparsity_cutoff_and_only_training_loads_start_a_figure_cache() -> None:
    from mathwizard.models import load_model
    from mathwizard.models.kernels import MLP_CLASS, MQA_CLASS

    def patched(model, class_name: str, method: str) -> bool:
        found = [m for m in model.modules() if type(m).__name__ == class_name]
        return bool(found) and all(method in vars(m) for m in found)

    alone, _ = load_model("tiny", "hf", for_training=False, kernels=ModelConfig().kernels)
    training, _ = load_model("tiny", "hf", for_training=True, kernels=ModelConfig().kernels)
    assert figure_cache(alone) is None and figure_cache(training) is not None  # nothing computed before: no cache
    assert patched(alone, MLP_CLASS, "_gaussian_topk") and not patched(training, MLP_CLASS, "_gaussian_topk")
    assert patched(alone, MQA_CLASS, "forward") and patched(training, MQA_CLASS, "forward")


def test_later_loads_of_the_same_tower_read_its_figures_and_another_tower_starts_afresh(tiny, tmp_path: Path) -> None:
    """SFT's figures serve the pairs, DPO and eval stages of a one-GPU pipeline: the same tower's weights, loaded
    again (here: saved and loaded back, as a merged model is), find them; a tower with any other weight does not."""
    import torch

    from mathwizard.models import load_model

    _, batch = tiny
    figures = {k: v for k, v in batch(0, 1).items() if k != "labels"}
    training, processor = load_model("tiny", "hf", for_training=True, kernels=["vision_cache"])
    training.requires_grad_(False)
    with torch.no_grad():
        training(**figures)
    cache = figure_cache(training)
    assert (cache.misses, cache.hits, len(cache.features)) == (2, 0, 2)

    inference, _ = load_model("tiny", "hf", for_training=False, kernels=["vision_cache"])
    assert figure_cache(inference) is cache
    with torch.no_grad():
        got = inference(**figures).logits
        assert (cache.misses, cache.hits) == (2, 2)  # both read, none computed
        remove_kernels(inference)
        want = inference(**figures).logits
    assert torch.equal(got, want)

    inference.save_pretrained(tmp_path / "same")
    processor.save_pretrained(tmp_path / "same")
    again, _ = load_model(str(tmp_path / "same"), "hf", for_training=False, kernels=["vision_cache"])
    assert figure_cache(again) is cache and tower_fingerprint(again.model.vision_tower) == tower_fingerprint(
        training.model.vision_tower
    )
    with torch.inference_mode():  # as the generation engine runs: a new figure is kept, as a normal tensor
        again(**{k: v for k, v in batch(2).items() if k != "labels"})
    assert cache.misses == 3 and not any(feature.is_inference() for feature in cache.features.values())

    weight = next(inference.model.vision_tower.parameters())
    with torch.no_grad():
        weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(1e9))  # one weight, one ulp
    inference.save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    other, _ = load_model(str(tmp_path / "other"), "hf", for_training=False, kernels=["vision_cache"])
    assert figure_cache(other) is None and "forward" not in vars(other.model.vision_tower)
    trained, _ = load_model(str(tmp_path / "other"), "hf", for_training=True, kernels=["vision_cache"])
    assert figure_cache(trained) is not cache and not figure_cache(trained).features  # the old figures dropped
    assert forget_figures() == 0 and figure_cache(trained) is not None  # loaded models keep their own reference


def test_the_sft_and_dpo_stages_read_figures_from_the_cache(tmp_path: Path) -> None:
    """SFT's second epoch and DPO's chosen, rejected and reference passes read the figures computed before: in the
    same process SFT's own, alone its own first sightings."""
    from mathwizard.stages import dpo, sft
    from tests.training.builders import pairs_folder, teach_folder

    teach = teach_folder(tmp_path / "02-teach", n_train=2, n_val=0)
    cfg = SFTConfig(max_steps=2, per_device_train_batch_size=2, max_length=512, eval_steps=None, save_steps=10**6)
    trainer, _ = sft.build_trainer(cfg, ModelConfig(), teach, tmp_path / "sft")
    trainer.train()
    cache = figure_cache(trainer.model)
    assert (cache.misses, cache.hits) == (2, 2)

    pairs = pairs_folder(tmp_path / "04-pairs", n_train=2, n_val=0)  # the same two figures
    cfg = DPOConfig(max_steps=1, per_device_train_batch_size=2, max_length=512, eval_steps=None, save_steps=10**6)
    trainer, _ = dpo.build_trainer(cfg, ModelConfig(), None, pairs, tmp_path / "dpo")
    trainer.train()
    assert figure_cache(trainer.model) is cache  # the same tower in the same process: SFT's figures
    assert cache.misses == 2 and cache.hits >= 2 + 8  # 2 figures x (chosen, rejected) x (policy, reference), all read

    forget_figures()
    trainer, _ = dpo.build_trainer(cfg, ModelConfig(), None, pairs, tmp_path / "dpo-alone")
    trainer.train()
    cache = figure_cache(trainer.model)
    assert cache.misses == 2 and cache.hits >= 6  # alone (another process): each figure computed once


def test_the_generation_engine_reads_the_figures_an_earlier_training_load_computed() -> None:
    """The pairs and eval stages after SFT in one process: the engine's prefills find SFT's figures (the same keys
    from the engine's own figure processing) and answer as without them."""
    from mathwizard.generation import to_pil
    from mathwizard.models import load_model
    from mathwizard.models.kernels import compute_figures
    from tests.test_decoding import _engine_answers, _requests

    requests = _requests(3)
    alone, processor = load_model("tiny", "hf", for_training=False, kernels=["vision_cache"])
    assert figure_cache(alone) is None  # nothing computed before it in this process
    want = _engine_answers(alone, processor, requests, 12, rows=2)

    training, _ = load_model("tiny", "hf", for_training=True, kernels=["vision_cache"])
    training.model.vision_tower.requires_grad_(False)  # as LoRA leaves it
    assert compute_figures(training, processor, [to_pil(r.image) for r in requests]) == 3
    after, _ = load_model("tiny", "hf", for_training=False, kernels=["vision_cache"])
    cache = figure_cache(after)
    assert not any(p.requires_grad for p in after.model.vision_tower.parameters())  # joined: frozen, never trained
    assert _engine_answers(after, processor, requests, 12, rows=2) == want
    assert (cache.misses, cache.hits) == (3, 3)


def test_new_figures_are_computed_outside_a_trainers_autocast_when_the_tower_has_one_dtype(tiny) -> None:
    """Under the trainers' autocast the tower's RMS norms (`pow`, `rsqrt`) would run in float32 (1.58x slower on the
    H200); a tower of one dtype computes its figures without it, as a generation load does. A tower of mixed dtypes
    (Unsloth's float32 norms without `uniform_dtype`) keeps the autocast it needs to run at all."""
    import torch

    model, batch = tiny
    remove_kernels(model)
    apply_kernels(model, ["vision_cache"])
    tower = model.model.vision_tower
    seen: list[bool] = []
    norm = next(m for m in tower.modules() if "RmsNorm" in type(m).__name__)
    hook = norm.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    norm_weight = norm.weight
    try:
        pixels = batch(0)["pixel_values"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tower(pixel_values=pixels, do_pooling=False, return_dict=True)
            norm_weight.data = norm_weight.data.to(torch.bfloat16)  # one weight of another dtype
            forget_figures()
            remove_kernels(model)
            apply_kernels(model, ["vision_cache"])
            tower(pixel_values=pixels, do_pooling=False, return_dict=True)
    finally:
        norm_weight.data = norm_weight.data.to(torch.float32)
        hook.remove()
        remove_kernels(model)
    assert seen == [False, True]
