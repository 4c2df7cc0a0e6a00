"""A tiny randomly initialised gemma-3n (~1 M parameters) with its processor, built offline and deterministically.

It has the real model's shape of things: the vocabulary layout (text ids < vision offset < audio offset), the
gemma-3n chat template, a byte-fallback BPE tokenizer (so any text round-trips), a SiglipImageProcessor, and
a timm MobileNetV5 vision encoder, shrunk. It lets every stage run on a CPU in seconds.

The shrunk vision encoder is a named timm architecture registered at run time: shrinking the real one through
`Gemma3nVisionConfig.model_args` breaks `save_pretrained` (timm mutates the block args in place), so every process
must call `register_timm_architectures()` before `from_pretrained` (`mathwizard.models.load_model` does).
Usage: `mathwizard model tiny --out DIR`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TINY_VERSION = 1  # bump when the built model changes; part of the cache folder's name
TIMM_ARCH = "mathwizard_tiny_mnv5_enc"
SEED = 1234

# Vocabulary layout, mirroring the real one (262144 / 262272 / 262400) at a small scale.
TEXT_VOCAB = 512  # ids below this are text (vocab_size_per_layer_input)
VISION_OFFSET = 512
AUDIO_OFFSET = 576
VOCAB_SIZE = 640
IMAGE_SIZE = 64
IMAGE_SEQ_LENGTH = 16  # 4 x 4 soft tokens per image
AUDIO_SEQ_LENGTH = 188  # the real value; the tiny audio tower is never fed in this project

SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<start_of_audio>",
)
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))

# The real gemma-3n chat template: the system text is merged into the first user turn, the assistant renders as
# "model", and an image item renders as <image_soft_token> (which the processor expands to the full sequence).
GEMMA3N_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'audio' -%}
                {{ '<audio_soft_token>' }}
            {%- elif item['type'] == 'image' -%}
                {{ '<image_soft_token>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# What the tokenizer is trained on: the words the pipeline's texts are made of, so they tokenize compactly.
_CORPUS = (
    "### Solution\n1. Since AB = AC, triangle ABC is isosceles, so angle B = angle C.\n"
    "2. The sum of the angles of a triangle is 180 degrees, so angle A = 180 - 2 x 50 = 80 degrees.\n"
    "### Final Answer\nThe answer is \\boxed{80^\\circ}.\n",
    "As shown in the figure, in triangle ABC, D is the midpoint of BC, and E is a point on AB. Find the length.",
    "Given that the circle O has radius 5 and chord AB = 8, find the distance from O to AB.",
    "By the Pythagorean theorem, OD = \\sqrt{5^2 - 4^2} = 3. Therefore the distance is \\boxed{3}.",
    "In parallelogram ABCD, the diagonals intersect at point O. Prove that triangle AOB is congruent to COD.",
    "Let x be the unknown side. Then 2x + 3 = 11, so x = 4. The perimeter is \\frac{1}{2} \\times 16 = 8.",
    "You are a math tutor. Solve the geometry problem in the figure step by step, then give the final answer.",
    "the of and is a to in that so by we are with as this angle triangle line point square area perimeter",
    "0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 36 45 60 90 100 120 135 150 180 270 360 cm m degrees",
    "\\angle \\triangle \\frac{a}{b} \\sqrt{2} \\pi \\cdot \\times \\div \\leq \\geq \\neq \\parallel \\perp \\cong",
)


# ------------------------------------------------------------------------------------------ timm arch
_ARCH_DEF = [
    ["er_r1_k3_s2_e2_c16"],  # 32x32 -> 16x16
    ["uir_r1_a3_k3_s2_e2_c24"],  # -> 8x8
    ["uir_r1_a3_k3_s2_e2_c32", "mqa_r1_k3_h2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"],  # -> 4x4; never end on mqa
    ["uir_r1_a3_k3_s1_e2_c32"],  # 4x4
]


def mathwizard_tiny_mnv5_enc(pretrained: bool = False, **kwargs: Any) -> Any:
    """timm entry point: the MobileNetV5 encoder of gemma-3n with four tiny stages and a 4x4 (16-token) output."""
    from timm.layers import RmsNorm2d
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.mobilenetv5 import _GELU, _create_mnv5_encoder

    model_kwargs = dict(
        block_args=decode_arch_def(_ARCH_DEF),
        stem_size=16,
        fix_stem=True,
        round_chs_fn=round_channels,
        norm_layer=RmsNorm2d,
        act_layer=_GELU,
        layer_scale_init_value=1e-5,
        msfa_output_resolution=4,
        pad_type=kwargs.pop("pad_type", "same"),
        pretrained_cfg=kwargs.pop("pretrained_cfg", None)
        or {"num_classes": 0, "input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "mean": (0.0,) * 3, "std": (1.0,) * 3},
    )
    return _create_mnv5_encoder(TIMM_ARCH, pretrained, **{**model_kwargs, **kwargs})


def register_timm_architectures() -> None:
    """Make the tiny vision encoder known to timm; idempotent; needed in every process before from_pretrained."""
    import timm
    from timm.models import register_model

    if not timm.is_model(TIMM_ARCH):
        register_model(mathwizard_tiny_mnv5_enc)


# ------------------------------------------------------------------------------------------ tokenizer
def _train_tokenizer(
    *,
    text_vocab: int = TEXT_VOCAB,
    vision_offset: int = VISION_OFFSET,
    audio_offset: int = AUDIO_OFFSET,
    vocab_size: int = VOCAB_SIZE,
    special_ids: dict[str, int] | None = None,
    model_max_length: int = 4096,
) -> Any:
    """A byte-fallback BPE: specials, 256 byte tokens and merges below `text_vocab`, then the vision/audio ids.

    `special_ids` places the special tokens (default: ids 0-8, in SPECIAL_TOKENS order); the other tokens fill
    the free ids in training order, and unused ids are filled with placeholders up to each range's end.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    special_ids = special_ids or {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    # Merges stay inside words (Gemma itself does not pre-split, so they apply the same way at encode time).
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=min(text_vocab, TEXT_VOCAB), special_tokens=[*SPECIAL_TOKENS, *BYTE_TOKENS], show_progress=False
    )
    trainer_tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    learned = [token for token, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if token not in special_ids]

    vocab: dict[str, int] = dict(special_ids)
    taken = set(special_ids.values())
    free = (i for i in range(text_vocab) if i not in taken)
    for token in learned:
        vocab[token] = next(free)
    for i in free:  # the rest of the text range
        vocab[f"<unused{i}>"] = i
    vocab["<end_of_image>"] = vision_offset
    vocab["<image_soft_token>"] = vision_offset + 1
    for i in range(vision_offset + 2, audio_offset):
        vocab[f"<unused_vision{i - vision_offset}>"] = i
    vocab["<end_of_audio>"] = audio_offset
    vocab["<audio_soft_token>"] = audio_offset + 1
    for i in range(audio_offset + 2, vocab_size):
        vocab[f"<unused_audio{i - audio_offset}>"] = i
    if len(vocab) != vocab_size or len(set(vocab.values())) != vocab_size:
        raise RuntimeError(f"tokenizer layout is not {vocab_size} distinct ids")

    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "audio_token": "<audio_soft_token>",
            "boa_token": "<start_of_audio>",
            "eoa_token": "<end_of_audio>",
        },
        padding_side="left",
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}, replace_extra_special_tokens=False
    )
    tokenizer.chat_template = GEMMA3N_CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: Any, *, image_size: int, image_seq_length: int) -> Any:
    """gemma-3n's processor around `tokenizer` (also used by the E2B-architecture builder)."""
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor, SiglipImageProcessor

    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        do_normalize=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        resample=2,  # bilinear, as gemma-3n's
    )
    return Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3N_CHAT_TEMPLATE,
        image_seq_length=image_seq_length,
        audio_seq_length=AUDIO_SEQ_LENGTH,
    )


def tiny_config() -> Any:
    """The tiny model's Gemma3nConfig (needs register_timm_architectures() before a model is built from it)."""
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig

    text = Gemma3nTextConfig(
        vocab_size=VOCAB_SIZE,
        vocab_size_per_layer_input=TEXT_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=128,
        max_position_embeddings=4096,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=0,
        laurel_rank=8,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0, 0.0],
    )
    vision = Gemma3nVisionConfig(
        architecture=TIMM_ARCH, hidden_size=2048, vocab_size=AUDIO_OFFSET - VISION_OFFSET, vocab_offset=VISION_OFFSET
    )
    audio = Gemma3nAudioConfig(
        vocab_size=VOCAB_SIZE - AUDIO_OFFSET,
        vocab_offset=AUDIO_OFFSET,
        hidden_size=32,
        conf_num_attention_heads=2,
        conf_num_hidden_layers=1,
        sscp_conv_channel_size=[8, 4],
    )
    return Gemma3nConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        vision_soft_tokens_per_image=IMAGE_SEQ_LENGTH,
        audio_soft_tokens_per_image=AUDIO_SEQ_LENGTH,
        boi_token_id=SPECIAL_TOKENS.index("<start_of_image>"),
        eoi_token_id=VISION_OFFSET,
        image_token_id=VISION_OFFSET + 1,
        boa_token_id=SPECIAL_TOKENS.index("<start_of_audio>"),
        eoa_token_id=AUDIO_OFFSET,
        audio_token_id=AUDIO_OFFSET + 1,
    )


def build_tiny(out: Path) -> Path:
    """Build the tiny model + processor into `out` (created or replaced) and return it.

    Deterministic: the same seed, corpus and config give the same weights and vocabulary.
    """
    import torch
    from transformers import Gemma3nForConditionalGeneration, GenerationConfig

    register_timm_architectures()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    processor = build_processor(tokenizer, image_size=IMAGE_SIZE, image_seq_length=IMAGE_SEQ_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Gemma3nForConditionalGeneration(tiny_config())
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, eot],  # a turn ends at <end_of_turn>, as in the real model
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "mathwizard_model.json").write_text(
        json.dumps({"kind": "tiny", "version": TINY_VERSION, "timm_arch": TIMM_ARCH}, indent=2) + "\n"
    )
    log.info("built the tiny gemma-3n (%s parameters) in %s", f"{model.num_parameters():,}", out)
    return out


def default_models_dir() -> Path:
    """Where built models are cached: $MATHWIZARD_MODELS_DIR, else ~/.cache/mathwizard/models."""
    env = os.environ.get("MATHWIZARD_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mathwizard" / "models"


def ensure_tiny(cache_dir: Path | None = None) -> Path:
    """The cached tiny model folder, built on first use.

    Built into a temporary sibling and renamed into place, so concurrent processes never see half a model;
    whichever finishes second throws its copy away.
    """
    root = Path(cache_dir) if cache_dir is not None else default_models_dir()
    target = root / f"tiny-v{TINY_VERSION}"
    if (target / "mathwizard_model.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tiny-v{TINY_VERSION}-"))
    try:
        build_tiny(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race (target exists and is not empty)
            if not (target / "mathwizard_model.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
