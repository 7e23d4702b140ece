"""Matrix FLOPs of one training sample, per stage, counted from the model's own modules.

Used for two things: what a GPU at a given MFU consumes in samples/s (so the data loader can be
sized against it, `benchmarks/loader.py`), and the MFU of a measured step (`benchmarks/gpu.py`).

Counting rule (the usual one for MFU, PaLM appendix B): every weight matrix costs 2 FLOPs per
token per element in the forward pass; attention scores and their weighted sum cost 4 * T * d
per token per layer (the whole T x T square, as that convention counts it); a backward pass
costs the forward's FLOPs once for input gradients and once more for weight gradients, and a
frozen part that gradients flow through pays only the first. Recomputation (activation
checkpointing) is not model work: it lowers MFU, it is not counted. Norms, activations and the
softmax are left out (a few percent).

What each stage does per sample (our model, as `llava-jp train` runs it):
- vision tower: forward only (frozen), up to the feature layer, once per S2 crop;
- projector: forward + input and weight gradients (trains in both stages; its input needs no gradient);
- LM: stage 1 forward + input gradients (frozen, the gradient reaches the projector through it);
  stage 2 forward + both gradients (with LoRA, as stage 1: the adapters' own work is left out);
- LM head: only at supervised positions (forward; in stage 2 both gradients, in stage 1 input
  gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava_jp.core import vision
from llava_jp.core.modeling import LlavaJpForConditionalGeneration

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets
PEAK_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "RTX 4090": 165.2}


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a GPU named like `torch.cuda.get_device_name` names it, if known."""
    for key, value in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def _matrix_elements(module: nn.Module) -> int:
    """Elements of the weight matrices a token multiplies through (Linear, GPT-2's Conv1D)."""
    total = 0
    for m in module.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 2 and not isinstance(m, nn.Embedding):
            total += w.numel()
    return total


@dataclass
class SampleShape:
    """Tokens of one training sample: its sequence length and how many positions are supervised."""

    tokens: int
    supervised: int


# the bench's sample shapes (benchmarks/sizes.py, llm-jp's data): stage 1 = 729 image tokens + a
# 30-60 token caption and its end token; stage 2 = system prompt + image + three turns, ~1060 tokens
STAGE_SHAPES = {1: SampleShape(tokens=729 + 46, supervised=46), 2: SampleShape(tokens=1068, supervised=233)}


def model_for_counting(config) -> LlavaJpForConditionalGeneration:
    """The model on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"):
        return LlavaJpForConditionalGeneration(config)


def sample_flops(model: LlavaJpForConditionalGeneration, stage: int, shape: SampleShape | None = None,
                 lm_trains: bool | None = None) -> dict:
    """Model FLOPs of one training sample in `stage`, by part (forward + backward as the stage runs them).

    `lm_trains`: whether the LM's weights get gradients (default: in stage 2); False for stage 2
    with LoRA, whose frozen base pays forward + input gradients as in stage 1."""
    shape = shape or STAGE_SHAPES[stage]
    lm_trains = stage == 2 if lm_trains is None else lm_trains
    config = model.config
    tower = model.vision_tower
    crops = sum((s // (config.s2_split_size or min(config.s2_scales))) ** 2 for s in config.s2_scales) \
        if config.s2_scales else 1
    n = vision.patch_grid(tower) ** 2
    used = vision.layers_used(tower, config.vision_feature_layer)
    if hasattr(tower, "timm_model"):
        layers, width, embed = tower.timm_model.blocks[:used], vision.feature_width(tower), tower.timm_model.patch_embed
    else:
        layers, width, embed = tower.encoder.layers[:used], tower.config.hidden_size, tower.embeddings
    patch = next(m for m in embed.modules() if isinstance(m, nn.Conv2d))
    tower_fwd = crops * (2 * n * (sum(_matrix_elements(l) for l in layers) + patch.weight.numel())
                         + used * 4 * n * n * width)

    t_img = model.num_image_tokens
    projector_fwd = 2 * t_img * _matrix_elements(model.multi_modal_projector)

    lm = model.language_model
    head = lm.get_output_embeddings()
    d = lm.config.hidden_size
    blocks = _matrix_elements(lm.base_model)
    lm_fwd = 2 * shape.tokens * blocks + lm.config.num_hidden_layers * 4 * shape.tokens * shape.tokens * d
    head_fwd = 2 * shape.supervised * head.weight.numel()
    lm_passes = 3 if lm_trains else 2  # frozen: forward + input gradients; trained: + weight gradients
    parts = {
        "vision_tower": tower_fwd,
        # forward + weight gradients of every layer + input gradients of all but the first
        "projector": 3 * projector_fwd - 2 * t_img * model.multi_modal_projector[0].weight.numel(),
        "language_model": lm_passes * lm_fwd,
        "lm_head": lm_passes * head_fwd,
    }
    return {"stage": stage, "tokens": shape.tokens, "supervised": shape.supervised, "s2_crops": crops,
            "flops_by_part": parts, "flops": sum(parts.values())}


def gpu_demand(model: LlavaJpForConditionalGeneration, peak: float = PEAK_TFLOPS["H200"], mfu: float = 0.4) -> dict:
    """Samples/s a GPU with `peak` TFLOP/s at `mfu` consumes in each stage (the loader must keep up)."""
    out = {"peak_tflops": peak, "mfu": mfu}
    for stage in (1, 2):
        f = sample_flops(model, stage)
        out[f"stage{stage}"] = {**f, "samples_per_s": peak * 1e12 * mfu / f["flops"]}
    return out
