"""Benchmark sizes (model shapes in llm-jp's proportions, batch shapes) and synthetic samples,
shared by the speed bench (`bench.py`) and the memory bench (`memory.py`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from llava_jp.core.modeling import IGNORE_INDEX
from llava_jp.presets.builder import load_preset


@dataclass
class BenchSize:
    """One benchmark configuration: model shapes (preset data), batch shapes, repetitions."""

    vision: dict
    language_model: dict
    s2_scales: list[int]
    stage1_batch: int = 4
    stage2_batch: int = 2
    caption_tokens: tuple[int, int] = (30, 60)  # stage 1: `<image>{caption}\n`
    answer_tokens: tuple[int, int] = (40, 100)  # stage 2: three question/answer turns
    question_tokens: tuple[int, int] = (10, 25)
    system_tokens: int = 30  # the llm-jp-v1 system prompt
    new_tokens: int = 64
    warmup: int = 1
    repeats: int = 5
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    stage2_optimizer_step: bool = True  # off at full size on a 24 GB CPU box: the LM's optimizer state does not fit


def _siglip(hidden: int, layers: int, heads: int, image: int = 384, patch: int = 14) -> dict:
    return {"model_type": "siglip_vision_model", "hidden_size": hidden, "intermediate_size": hidden * 4304 // 1152,
            "num_hidden_layers": layers, "num_attention_heads": heads, "image_size": image, "patch_size": patch,
            "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}


def _gpt2(width: int, layers: int, heads: int, vocab: int = 50688) -> dict:
    return {"model_type": "gpt2", "n_embd": width, "n_layer": layers, "n_head": heads, "n_positions": 2048,
            "vocab_size": vocab, "bos_token_id": 7, "eos_token_id": 7, "tie_word_embeddings": False,
            "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}


def bench_size(name: str) -> BenchSize:
    """`mid` (the default: seconds per step on a laptop CPU), `full` (the real preset) or `tiny` (tests)."""
    if name == "mid":
        # SigLIP-shaped at 384 px / patch 14 (729 tokens), 288 wide (head dim 72, as so400m) x 7 deep;
        # GPT-2 512 x 6 (width/depth 85, as 2048 x 24)
        return BenchSize(vision=_siglip(288, 7, 4), language_model=_gpt2(512, 6, 4), s2_scales=[384, 768])
    if name == "full":
        preset = load_preset("llava-jp-1.3b-s2")
        return BenchSize(vision=dict(preset.vision.config), language_model={**preset.language_model.config,
                         "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
                         s2_scales=list(preset.vision.s2_scales), stage1_batch=1, stage2_batch=1,
                         warmup=1, repeats=3, gradient_checkpointing=True, optimizer="adamw_8bit",
                         stage2_optimizer_step=torch.cuda.is_available())
    if name == "tiny":
        return BenchSize(vision=_siglip(32, 2, 2, image=56), language_model=_gpt2(32, 2, 2, vocab=1000),
                         s2_scales=[56, 112], stage1_batch=2, stage2_batch=2, caption_tokens=(5, 10),
                         answer_tokens=(4, 8), question_tokens=(2, 4), system_tokens=4, new_tokens=8, repeats=2)
    raise ValueError(f"unknown bench size {name!r}; expected mid, full or tiny")


# the bench models' `<image>`: a row below the ids `_tokens` draws (text ids are >= 100)
BENCH_IMAGE_TOKEN_ID = 1


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def _sample(size: BenchSize, stage: int, rng: random.Random, n_image: int, image_id: int, vocab: int, turns: int = 3):
    """Token ids and labels shaped like a real stage-1 caption or stage-2 conversation."""
    eos = 7
    if stage == 1:
        caption = _tokens(rng, rng.randint(*size.caption_tokens), vocab) + [eos]
        return [image_id] * n_image + caption, [IGNORE_INDEX] * n_image + caption
    ids = _tokens(rng, size.system_tokens, vocab)
    labels = [IGNORE_INDEX] * len(ids)
    for turn in range(turns):
        prompt = _tokens(rng, 3, vocab) + ([image_id] * n_image if turn == 0 else [])
        prompt += _tokens(rng, rng.randint(*size.question_tokens), vocab) + _tokens(rng, 3, vocab)
        answer = _tokens(rng, rng.randint(*size.answer_tokens), vocab) + [eos]
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
    return ids, labels


def padded_batch(samples: list[tuple[list[int], list[int]]], image_size: int, seed: int) -> dict:
    """Right-padded `input_ids` / `attention_mask` / `labels` for (ids, labels) samples, plus
    seeded random `pixel_values` of one image per sample."""
    batch, length = len(samples), max(len(ids) for ids, _ in samples)
    out = {"input_ids": torch.zeros(batch, length, dtype=torch.long),
           "attention_mask": torch.zeros(batch, length, dtype=torch.long),
           "labels": torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)}
    for i, (ids, labels) in enumerate(samples):
        out["input_ids"][i, :len(ids)] = torch.tensor(ids)
        out["attention_mask"][i, :len(ids)] = 1
        out["labels"][i, :len(ids)] = torch.tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    out["pixel_values"] = torch.randn(batch, 3, image_size, image_size, generator=generator)
    return out
