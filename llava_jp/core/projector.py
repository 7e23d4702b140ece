"""The multimodal projector: vision features -> LM embedding width."""

from __future__ import annotations

import re

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
