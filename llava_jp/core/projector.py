"""The multimodal projector: vision features -> LM embedding width."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn


def build_projector(projector_type: str, in_features: int, out_features: int) -> nn.Sequential:
    """`linear` or `mlpNx_gelu` (N linear layers with GELU between), as in LLaVA-1.5.

    Layer indices match LLaVA's `mm_projector` (0, 2, ...) so checkpoints map one-to-one.
    """
    if projector_type == "linear":
        return nn.Sequential(nn.Linear(in_features, out_features))
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"unknown projector_type {projector_type!r}; expected 'linear' or 'mlpNx_gelu'")
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


def merged_tokens(tokens: int, factor: int) -> int:
    """Image tokens left after `pixel_shuffle` with `factor` (729 = 27 x 27 -> 14 x 14 = 196 for 2)."""
    side = math.ceil(math.isqrt(tokens) / factor)
    return side * side


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """(n, g*g, C) -> (n, ceil(g/f)^2, C*f*f): each f x f block of neighbouring tokens becomes one
    token with their channels concatenated (nanoVLM's and NVILA's token compression). A grid
    that `factor` does not divide is zero-padded at the right and bottom (27 -> 28 for f = 2)."""
    if factor == 1:
        return features
    n, tokens, channels = features.shape
    g = math.isqrt(tokens)
    if g * g != tokens:
        raise ValueError(f"pixel shuffle needs a square token grid, got {tokens} tokens")
    padded = math.ceil(g / factor) * factor
    grid = features.reshape(n, g, g, channels)
    if padded != g:
        grid = F.pad(grid, (0, 0, 0, padded - g, 0, padded - g))
    side = padded // factor
    grid = grid.reshape(n, side, factor, side, factor, channels).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, side * side, factor * factor * channels)
