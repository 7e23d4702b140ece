"""Vision tower features: one crop -> patch tokens, and S2 multi-scale tiling on top.

The tower is a transformers `SiglipVisionModel` or a `TimmWrapperModel` (any timm ViT). We
run only the layers up to `vision_feature_layer` (no later layers, no post-layernorm, no
pooling head) and keep every patch token: SigLIP has no CLS token, so 384 px / patch 14 gives
all 729 = 27x27 tokens, on the true square grid that S2 stitching relies on.

`image_features_llava_jp_v1_1` reproduces the predecessor's layout (728 tokens on a 26x28 grid)
for checkpoints imported from llava-jp v1.1 only; `IMAGE_FEATURES` maps a config's
`vision_layout` to its function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:
    import s2wrapper
except ImportError as error:  # the PyPI name differs from the module name
    raise ImportError("llava-jp needs the `s2wrapper` module: pip install scaling-on-scales") from error

DEFAULT_LAYOUT = "default"
LLAVA_JP_V1_1_LAYOUT = "llava-jp-v1.1-compat"


def _is_timm(tower: nn.Module) -> bool:
    return hasattr(tower, "timm_model")


def feature_width(tower: nn.Module) -> int:
    """Channels of one crop's patch features."""
    if _is_timm(tower):
        return int(tower.timm_model.num_features)
    return int(tower.config.hidden_size)


def patch_grid(tower: nn.Module) -> int:
    """Patch tokens per side for one crop at the tower's native input size."""
    if _is_timm(tower):
        return int(tower.timm_model.patch_embed.grid_size[0])
    return int(tower.config.image_size // tower.config.patch_size)


def _depth(tower: nn.Module) -> int:
    if _is_timm(tower):
        return len(tower.timm_model.blocks)
    return len(tower.encoder.layers)


def layers_used(tower: nn.Module, feature_layer: int) -> int:
    """How many encoder layers must run to produce hidden_states[feature_layer].

    hidden_states[0] is the patch embedding, hidden_states[i] the output of layer i.
    """
    depth = _depth(tower)
    used = feature_layer if feature_layer >= 0 else depth + 1 + feature_layer
    if not 1 <= used <= depth:
        raise ValueError(f"vision_feature_layer={feature_layer} is out of range for a {depth}-layer tower")
    return used


def _used_parameters(tower: nn.Module, feature_layer: int) -> list[nn.Parameter]:
    used = layers_used(tower, feature_layer)
    if _is_timm(tower):
        model = tower.timm_model
        modules = [model.patch_embed, getattr(model, "norm_pre", nn.Identity()), *model.blocks[:used]]
        loose = [getattr(model, n, None) for n in ("pos_embed", "cls_token", "reg_token")]
    else:
        modules = [tower.embeddings, *tower.encoder.layers[:used]]
        loose = []
    return [p for m in modules for p in m.parameters()] + [p for p in loose if isinstance(p, nn.Parameter)]


def unused_parameters(tower: nn.Module, feature_layer: int) -> list[nn.Parameter]:
    """Parameters that never receive a gradient: layers past the feature layer, final norm, head."""
    kept = {id(p) for p in _used_parameters(tower, feature_layer)}
    return [p for p in tower.parameters() if id(p) not in kept]


def is_trainable(tower: nn.Module, feature_layer: int) -> bool:
    """Whether any parameter that the features depend on requires a gradient."""
    return any(p.requires_grad for p in _used_parameters(tower, feature_layer))


def crop_features(tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """(B, 3, S, S) crops at the tower's native size -> (B, grid*grid, C) patch tokens."""
    used = layers_used(tower, feature_layer)
    if _is_timm(tower):
        (hidden,) = tower.timm_model.forward_intermediates(
            pixel_values, indices=[used - 1], norm=False, stop_early=True,
            output_fmt="NLC", intermediates_only=True,
        )
        return hidden
    hidden = tower.embeddings(pixel_values)
    for layer in tower.encoder.layers[:used]:
        hidden = layer(hidden, None)
    return hidden


def image_features(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    feature_layer: int,
    s2_scales: list[int] | None = None,
    s2_split_size: int | None = None,
) -> torch.Tensor:
    """(B, 3, H, W) images -> (B, grid*grid, C * number of scales).

    Single scale: the image goes through the tower once. S2: `s2wrapper` resizes the image to
    each scale, splits scales larger than `s2_split_size` into crops, stitches each scale's crop
    features back into one grid, area-pools every scale to the smallest scale's grid and
    concatenates the scales on channels.
    """

    def run(x: torch.Tensor) -> torch.Tensor:
        return crop_features(tower, x, feature_layer)

    if not s2_scales:
        return run(pixel_values)
    return s2wrapper.forward(run, pixel_values, img_sizes=list(s2_scales), max_split_size=s2_split_size or min(s2_scales))


def image_features_llava_jp_v1_1(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    feature_layer: int,
    s2_scales: list[int] | None = None,
    s2_split_size: int | None = None,
) -> torch.Tensor:
    """The llava-jp v1.1 layout, for imported checkpoints: (B, 3, H, W) -> (B, grid*grid - 1, C * scales).

    Token 0 of every crop is dropped (the predecessor treated it as a CLS token; SigLIP has
    none), each crop's remaining tokens are laid out row-major on an h x w grid with
    h = floor(sqrt(n)) (26x28 for 728 tokens), crops are stitched, every scale is area-pooled
    to h x w, and the scales are concatenated on channels larger scale first.
    """

    def run(x: torch.Tensor) -> torch.Tensor:
        return crop_features(tower, x, feature_layer)[:, 1:]

    if not s2_scales:
        return run(pixel_values)
    split = s2_split_size or min(s2_scales)
    tokens = patch_grid(tower) ** 2 - 1
    height = math.isqrt(tokens)
    width = tokens // height
    per_scale = []
    for size in sorted(s2_scales, reverse=True):
        image = F.interpolate(pixel_values.float(), size=size, mode="bicubic").to(pixel_values.dtype)
        crops = run(s2wrapper.split_chessboard(image, num_split=size // split))
        grid = crops.transpose(1, 2).reshape(crops.shape[0], crops.shape[2], height, width)
        grid = s2wrapper.merge_chessboard(grid, num_split=size // split)
        per_scale.append(F.interpolate(grid.float(), size=(height, width), mode="area").to(grid.dtype))
    return torch.cat(per_scale, dim=1).flatten(2).transpose(1, 2)


IMAGE_FEATURES = {DEFAULT_LAYOUT: image_features, LLAVA_JP_V1_1_LAYOUT: image_features_llava_jp_v1_1}


def tokens_per_image(tower: nn.Module, layout: str = DEFAULT_LAYOUT) -> int:
    """Image tokens per image: grid*grid (729 for SigLIP-384), one fewer in the v1.1 layout (728)."""
    return patch_grid(tower) ** 2 - (1 if layout == LLAVA_JP_V1_1_LAYOUT else 0)
