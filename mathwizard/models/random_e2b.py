"""A randomly initialised model with gemma-3n E2B's real architecture, and a processor with its vocabulary layout.

No real weights can be fetched where the GPU benchmarks run; a random model of the same architecture costs the
same per token, so speed and memory are measured on it. The config is the real E2B one (the `Gemma3nTextConfig`
defaults describe E4B: E2B has 30 layers, intermediate size 8192, 10 KV-shared layers and activation sparsity
0.95 on its first 10 layers), with timm's `mobilenetv5_300m_enc` vision tower and the default audio tower.
The tokenizer has the real layout (262,144 text ids, vision ids from 262,144, audio from 262,272, 262,400 in all,
specials at their real ids) but a small learned BPE, so a text takes more tokens than with Gemma's own tokenizer.

Usage: `mathwizard model random-e2b --out DIR --device cuda` (about 5 B parameters: build it on the GPU).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mathwizard.models.tiny import (
    AUDIO_SEQ_LENGTH,
    SEED,
    _train_tokenizer,
    build_processor,
)

log = logging.getLogger(__name__)

E2B_VERSION = 1
TEXT_VOCAB = 262_144
VISION_OFFSET = 262_144
AUDIO_OFFSET = 262_272
VOCAB_SIZE = 262_400
IMAGE_SIZE = 768
IMAGE_SEQ_LENGTH = 256  # 16 x 16 soft tokens per image
NUM_LAYERS = 30
# Where the real gemma-3n tokenizer keeps its special tokens.
SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<start_of_turn>": 105,
    "<end_of_turn>": 106,
    "<start_of_image>": 255_999,
    "<start_of_audio>": 256_000,
}


def e2b_config() -> Any:
    """gemma-3n E2B's Gemma3nConfig (as published for google/gemma-3n-E2B-it)."""
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig

    text = Gemma3nTextConfig(
        vocab_size=VOCAB_SIZE,
        vocab_size_per_layer_input=TEXT_VOCAB,
        hidden_size=2048,
        intermediate_size=[8192] * NUM_LAYERS,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        hidden_size_per_layer_input=256,
        num_kv_shared_layers=10,
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * (NUM_LAYERS - 10),
        layer_types=[
            "full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(NUM_LAYERS)
        ],  # four sliding-window layers, then one global, as in gemma-3n
        sliding_window=512,
        max_position_embeddings=32_768,
        altup_num_inputs=4,
        laurel_rank=64,
    )
    vision = Gemma3nVisionConfig(
        architecture="mobilenetv5_300m_enc", hidden_size=2048, vocab_size=128, vocab_offset=VISION_OFFSET
    )
    audio = Gemma3nAudioConfig(vocab_size=128, vocab_offset=AUDIO_OFFSET)
    return Gemma3nConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        vision_soft_tokens_per_image=IMAGE_SEQ_LENGTH,
        audio_soft_tokens_per_image=AUDIO_SEQ_LENGTH,
        boi_token_id=SPECIAL_IDS["<start_of_image>"],
        eoi_token_id=VISION_OFFSET,
        image_token_id=VISION_OFFSET + 1,
        boa_token_id=SPECIAL_IDS["<start_of_audio>"],
        eoa_token_id=AUDIO_OFFSET,
        audio_token_id=AUDIO_OFFSET + 1,
    )


def e2b_processor() -> Any:
    """A Gemma3nProcessor with the real vocabulary layout (262,400 ids), 768x768 images and 256 image tokens."""
    tokenizer = _train_tokenizer(
        text_vocab=TEXT_VOCAB,
        vision_offset=VISION_OFFSET,
        audio_offset=AUDIO_OFFSET,
        vocab_size=VOCAB_SIZE,
        special_ids=SPECIAL_IDS,
        model_max_length=32_768,
    )
    return build_processor(tokenizer, image_size=IMAGE_SIZE, image_seq_length=IMAGE_SEQ_LENGTH)


def build_random_e2b(out: Path, *, device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """Build the random E2B-architecture model + processor into `out`; build on the GPU (`device="cuda"`) if any.

    On a CPU it needs ~11 GB of memory in bf16 and minutes of initialisation.
    """
    import torch
    from transformers import Gemma3nForConditionalGeneration, GenerationConfig

    torch_type = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    processor = e2b_processor()
    config = e2b_config()
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        if device.startswith("cuda"):
            torch.cuda.manual_seed_all(SEED)
        torch.set_default_dtype(torch_type)
        try:
            with torch.device(device):
                model = Gemma3nForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
    model.config.dtype = torch_type
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "mathwizard_model.json").write_text(
        json.dumps({"kind": "random-e2b", "version": E2B_VERSION, "parameters": model.num_parameters()}, indent=2)
        + "\n"
    )
    log.info("built a random gemma-3n E2B (%s parameters) in %s", f"{model.num_parameters():,}", out)
    return out


def count_parameters() -> dict[str, int]:
    """Parameters per tower of the E2B architecture, counted on the meta device (no memory, no init)."""
    import torch
    from transformers import Gemma3nForConditionalGeneration

    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration(e2b_config())
    counts = {"total": sum(p.numel() for p in model.parameters())}
    for name, module in model.model.named_children():
        counts[name] = sum(p.numel() for p in module.parameters())
    return counts
