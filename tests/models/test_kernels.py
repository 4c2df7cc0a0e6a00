"""`model.kernels`: each fused replacement computes gemma-3n's own function (tiny model, float32, forward and
gradients), keeps the dtypes of the model's own code, and reaches the model through the stages' loading.

The batch is left-padded: a padding query then attends to nothing, which eager attention turns into a uniform row and
plain SDPA into NaN gradients (torch's math kernel) that reach every weight; `sdpa_attention` must do as eager does."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathwizard.config import ModelConfig, SFTConfig
from mathwizard.models.kernels import (
    KERNELS,
    RMS_NORM_CLASS,
    SDPA,
    apply_kernels,
    fused_rms_norm_forward,
    remove_kernels,
)


def _conversation(seed: int, question: str, answer: str) -> list[dict]:
    from PIL import Image

    image = Image.new("RGB", (60 + 10 * seed, 40), (40 * seed % 256, 90, 200))
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


@pytest.fixture(scope="module")
def tiny_batch() -> tuple:
    """The tiny model for training and a batch of two image conversations of different lengths, left-padded (as
    Unsloth's tokenizer pads), labels on the real tokens that real tokens predict."""
    import torch

    from mathwizard.models import load_model

    torch.set_num_threads(1)
    model, processor = load_model("tiny", "hf", for_training=True)
    conversations = [
        _conversation(1, "Find x.", "x = 7 because the angles add up to 180 degrees."),
        _conversation(3, "Find the area of the triangle ABC drawn in the figure.", "49"),
    ]
    batch = processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    assert (batch["attention_mask"][:, 0] == 0).any()  # a left-padded row is part of what is compared
    padding = batch["attention_mask"] == 0
    labels = batch["input_ids"].masked_fill(padding, -100)
    labels[:, 1:][padding[:, :-1]] = -100  # nor a token predicted from a padding position (prompts are never labels)
    batch["labels"] = labels
    return model, batch


def _forward_backward(model, batch) -> tuple:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    real = batch["attention_mask"].bool()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach()[real], grads


def _unpatched(model) -> None:
    remove_kernels(model)
    model.set_attn_implementation({"text_config": "eager"})


@pytest.fixture(scope="module")
def own_result(tiny_batch) -> tuple:
    """The model's own code on the batch: loss, real positions' logits, every gradient (computed once)."""
    model, batch = tiny_batch
    _unpatched(model)
    return _forward_backward(model, batch)


# `sparsity` and `uniform_dtype` are left to their own tests below: the tiny model's MLPs have no activation
# sparsity, and in float32 it has nothing to cast.
@pytest.mark.parametrize(
    "kernels",
    [[name] for name in KERNELS if name not in ("sparsity", "uniform_dtype")] + [list(KERNELS)],
    ids=lambda k: "+".join(k),
)
def test_each_kernel_computes_the_models_own_function(tiny_batch, own_result, kernels: list[str]) -> None:
    model, batch = tiny_batch
    loss, logits, grads = own_result
    _unpatched(model)

    done = apply_kernels(model, kernels)
    assert set(done) == set(kernels)  # each one found its modules in gemma-3n (float32: nothing to cast)
    assert all(count for name, count in done.items() if name != "uniform_dtype")
    got_loss, got_logits, got_grads = _forward_backward(model, batch)
    _unpatched(model)

    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert (got_logits - logits).abs().max().item() < 1e-4
    assert got_grads.keys() == grads.keys() and len(grads) > 100  # every weight, the norms' and AltUp's included
    for name, grad in grads.items():
        assert got_grads[name] == pytest.approx(grad, rel=1e-3, abs=1e-5), name


def test_the_patches_are_on_the_instances_and_the_state_dict_is_unchanged(tiny_batch) -> None:
    model, _ = tiny_batch
    _unpatched(model)
    keys = list(model.state_dict())
    done = apply_kernels(model, KERNELS)
    norms = [m for m in model.modules() if type(m).__name__ == RMS_NORM_CLASS]
    assert done["rms_norm"] == len(norms) > 10  # the language model's, the audio tower's, the embedders'
    assert all("forward" in vars(m) for m in norms)
    assert model.config.text_config._attn_implementation == SDPA
    assert apply_kernels(model, ["sdpa"]) == {"sdpa": 0}  # already switched: nothing to do
    assert list(model.state_dict()) == keys
    _unpatched(model)
    with pytest.raises(ValueError, match="unknown kernels \\['flash'\\]"):
        apply_kernels(model, ["flash"])


def test_the_fused_norm_keeps_the_input_dtype_under_autocast_and_with_a_float32_weight() -> None:
    import torch
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm

    x = torch.randn(3, 5, 64, dtype=torch.bfloat16) * 4
    for with_scale in (True, False):
        norm = Gemma3nRMSNorm(64, eps=1e-6, with_scale=with_scale)
        if with_scale:
            torch.nn.init.normal_(norm.weight)  # float32, as a norm that was never cast
        want = norm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused_rms_norm_forward(norm, x)
        assert got.dtype == torch.bfloat16
        assert (got.float() - want.float()).abs().max().item() <= 0.02 * want.float().abs().max().item()
        norm.to(torch.bfloat16)
        same_dtype = fused_rms_norm_forward(norm, x)
        assert same_dtype.dtype == torch.bfloat16
        assert torch.allclose(same_dtype.float(), norm(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)], ids=["full", "strided"])  # MobileNetV5 has both
def test_the_folded_vision_attention_is_timms_function_with_one_head_on_each_side(strides: tuple) -> None:
    """timm hands SDPA 4 query heads against 1 broadcast key/value head; on CUDA no fused kernel takes that (PyTorch
    falls back to float32 math). Folded, SDPA sees 1 head on each side: the same outputs and gradients."""
    import torch
    from timm.layers.attention2d import MultiQueryAttention2d
    from torch.overrides import TorchFunctionMode

    from mathwizard.models.kernels import MQA_CLASS, folded_mqa_forward

    class Heads(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                self.seen.append((args[0].shape[1], args[1].shape[1], args[2].shape[1]))
            return func(*args, **(kwargs or {}))

    query_strides, kv_stride = strides
    torch.manual_seed(0)
    attention = MultiQueryAttention2d(
        32, num_heads=4, key_dim=8, value_dim=8, query_strides=query_strides, kv_stride=kv_stride, padding="same"
    )
    assert type(attention).__name__ == MQA_CLASS and attention.fused_attn
    x = torch.randn(2, 32, 8, 8)
    results = []
    for forward in (attention.forward, lambda t: folded_mqa_forward(attention, t)):
        attention.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        with Heads() as heads:
            out = forward(leaf)
        out.square().sum().backward()
        grads = [leaf.grad] + [p.grad for p in attention.parameters()]
        results.append((out.detach(), grads, heads.seen.pop()))
    (want, want_grads, timm_heads), (got, got_grads, folded_heads) = results
    assert timm_heads == (4, 1, 1) and folded_heads == (1, 1, 1)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    mask = torch.zeros(1, 1, (8 // query_strides) ** 2, (8 // kv_stride) ** 2)
    assert torch.equal(folded_mqa_forward(attention, x, mask), attention(x, mask))  # a mask: timm's own path


def test_the_setting_is_validated_and_left_out_of_the_fingerprint() -> None:
    from pydantic import ValidationError

    from mathwizard.models.ref import resolve

    assert ModelConfig().kernels == list(KERNELS)
    with pytest.raises(ValidationError):
        ModelConfig(kernels=["flash"])
    ref = resolve("tiny")
    assert ref.identity(ModelConfig(kernels=[])) == ref.identity(ModelConfig())


def test_the_sft_stage_loads_its_model_with_the_configured_kernels(tmp_path: Path) -> None:
    from mathwizard.stages import sft
    from tests.training.builders import teach_folder

    teach = teach_folder(tmp_path / "02-teach", n_train=2, n_val=0)
    cfg = SFTConfig(max_steps=1, per_device_train_batch_size=2, max_length=512, eval_steps=None)

    def patched(trainer) -> set[str]:
        names = {type(m).__name__ for m in trainer.model.modules() if "forward" in vars(m) or "predict" in vars(m)}
        return names & {RMS_NORM_CLASS, "Gemma3nTextAltUp"}

    trainer, _ = sft.build_trainer(cfg, ModelConfig(kernels=["rms_norm", "altup"]), teach, tmp_path / "fused")
    assert patched(trainer) == {RMS_NORM_CLASS, "Gemma3nTextAltUp"}
    trainer, _ = sft.build_trainer(cfg, ModelConfig(kernels=[]), teach, tmp_path / "own")
    assert patched(trainer) == set()


def test_the_sparsity_cutoff_is_the_models_own_and_builds_no_tensor_from_a_number_after_its_first_call() -> None:
    """E2B's first 10 MLPs cut activations at mean + z·std. The model's code makes z with `torch.tensor(...,
    device=cuda)` at every call: a host-to-device copy that makes the CPU wait for the GPU (`aten.lift_fresh` here on
    the CPU). `sparsity` gives the same values and gradients, float32 and bf16, and makes no tensor after call one."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import Gemma3nTextConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextMLP

    from mathwizard.models.kernels import MLP_CLASS, cached_gaussian_topk

    config = Gemma3nTextConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, activation_sparsity_pattern=[0.95, 0.0]
    )
    torch.manual_seed(0)
    mlp = Gemma3nTextMLP(config, layer_idx=0)
    assert type(mlp).__name__ == MLP_CLASS and mlp.activation_sparsity == 0.95

    class Made(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += str(func) == "aten.lift_fresh.default"
            return func(*args, **(kwargs or {}))

    for dtype in (torch.float32, torch.bfloat16):
        mlp.to(dtype)
        x = torch.randn(3, 7, 64, dtype=dtype) * 3
        want_x, got_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        want = mlp(want_x)
        want.square().sum().backward()
        apply_kernels(mlp, ["sparsity"])
        got = mlp(got_x)
        got.square().sum().backward()
        with Made() as made:
            mlp(x)
        remove_kernels(mlp)
        assert torch.equal(got, want) and torch.equal(got_x.grad, want_x.grad), dtype
        assert made.count == 0
    assert cached_gaussian_topk.__doc__ and "_gaussian_topk" not in vars(mlp)


def test_uniform_dtype_casts_a_bf16_models_float32_weights_exactly_and_nothing_else() -> None:
    """Unsloth loads gemma-3n's norm weights in float32; `uniform_dtype` gives them back the checkpoint's bf16 (an
    exact cast: they were bf16 values), keeps the float32 buffers (rotary frequencies) and a trainer's float32
    adapters, and leaves float32 and float16 models alone."""
    import torch

    from mathwizard.models import load_model

    model, _ = load_model("tiny", "hf", for_training=True, dtype="bfloat16")
    norms = {name: p for name, p in model.named_parameters() if "norm" in name}
    assert len(norms) > 20 and any("vision_tower" in name for name in norms)
    for param in norms.values():  # what Unsloth's load leaves: bf16 values held in float32
        param.data = param.data.to(torch.float32)
    before = {name: p.detach().clone() for name, p in norms.items()}
    buffers = {name: b.dtype for name, b in model.named_buffers()}
    assert torch.float32 in buffers.values()

    assert apply_kernels(model, ["uniform_dtype"]) == {"uniform_dtype": len(norms)}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, param in norms.items():
        assert torch.equal(param.float(), before[name]), name
    assert {name: b.dtype for name, b in model.named_buffers()} == buffers
    assert apply_kernels(model, ["uniform_dtype"]) == {"uniform_dtype": 0}

    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    for name, param in adapted.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(torch.float32)  # the trainer's float32 copy of what it trains
    lora = sum(1 for name, p in adapted.named_parameters() if "lora_" in name and p.dtype == torch.float32)
    assert lora > 0 and apply_kernels(adapted, ["uniform_dtype"]) == {"uniform_dtype": 0}

    half, _ = load_model("tiny", "hf", for_training=True, dtype="float16")
    next(half.parameters()).data = next(half.parameters()).data.float()
    assert apply_kernels(half, ["uniform_dtype"]) == {"uniform_dtype": 0}
    full, _ = load_model("tiny", "hf", for_training=True)  # float32 on a CPU
    assert apply_kernels(full, ["uniform_dtype"]) == {"uniform_dtype": 0}
