"""What lets vLLM's Transformers backend serve our model with a GPT-2 LM (the llm-jp-1.3b recipe).

vLLM runs this very code (`--model-impl transformers`), swapping in its own attention and
weight loading. Two things of transformers' GPT-2 do not survive that; both are made exact here,
and neither changes what a transformers user computes (same weights, same names, same logits):

- vLLM skips every checkpoint weight that one of `_keys_to_ignore_on_load_unexpected` `search`es
  (transformers only silences unexpected-key warnings with them), and GPT-2's "attn.bias" (an old
  causal-mask buffer) matches every `c_attn.bias`: the QKV biases stayed unloaded.
- vLLM's attention returns (tokens, heads * head_dim); GPT-2 flattens it with
  `reshape(*shape[:-2], -1)`, written for transformers' (batch, seq, heads, head_dim), and hands
  its output projection one flat vector.
"""

from __future__ import annotations

import re

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


def sparing_ignore_patterns(patterns, own_names: list[str]) -> set[str]:
    """The ignore patterns without any that matches one of our own weights (`own_names`): such a
    pattern is anchored at a name boundary ("h.0.attn.bias" still matches, "c_attn.bias" no
    longer), or dropped if it still matches one."""
    kept = set()
    for pattern in patterns or ():
        if any(re.search(pattern, name) for name in own_names):
            pattern = rf"(?:^|\.)(?:{pattern})"
            if any(re.search(pattern, name) for name in own_names):
                continue
        kept.add(pattern)
    return kept


class AttentionOutputProjection(Conv1D):
    """GPT-2's attention output projection (`attn.c_proj`), also fed vLLM's attention output,
    which GPT-2 has flattened to one vector: the input width comes from the weight instead."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 1:
            x = x.view(-1, self.nx)
        return super().forward(x)


def servable_language_model(language_model: nn.Module) -> nn.Module:
    """`language_model` with every GPT-2 attention output projection an `AttentionOutputProjection`
    (the same module and parameters, one branch more); other LMs are returned as they are."""
    for attention in language_model.modules():
        projection = getattr(attention, "c_proj", None)
        if type(projection) is Conv1D and hasattr(attention, "c_attn"):
            projection.__class__ = AttentionOutputProjection  # no state of its own: weights, hooks, ZeRO stay
    return language_model
