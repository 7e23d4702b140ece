"""`LlavaJpConfig`: a vision sub-config, a text sub-config, and how they are joined."""

from __future__ import annotations

import re

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

VISION_LAYOUTS = ("default", "llava-jp-v1.1-compat")


class LlavaJpConfig(PreTrainedConfig):
    """Configuration of a LLaVA-style Japanese VLM.

    vision_config: a `SiglipVisionConfig` (transformers) or `TimmWrapperConfig` (timm backbone).
    text_config: any causal-LM config (GPT-2 for llm-jp-1.3b, Llama for llm-jp-3, ...).
    vision_feature_layer: index into the encoder's hidden states (-2 = penultimate layer).
    s2_scales: image sizes of the S2 scales, smallest first (None = single scale).
    s2_split_size: crop size for S2 (None = the vision tower's input size).
    projector_type: "linear" or "mlpNx_gelu".
    image_token_id: placeholder id the processor writes for each image token; negative by
        default so it lies outside every vocabulary and the LM's embeddings never change.
    vision_layout: "default", or "llava-jp-v1.1-compat" for imported predecessor checkpoints.
    projector_pixel_shuffle: f > 1 merges each f x f block of image tokens into one before the
        projector (729 -> 196 for 2); 1 = off.
    """

    model_type = "llava_jp"

    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    s2_scales: list[int] | None = None
    s2_split_size: int | None = None
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = -200
    vision_layout: str = "default"
    projector_pixel_shuffle: int = 1
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_fields()

    def validate_fields(self) -> None:
        """Check the joining fields once, with errors that name the field."""
        if not re.fullmatch(r"linear|mlp\d+x_gelu", self.projector_type):
            raise ValueError(f"projector_type: expected 'linear' or 'mlpNx_gelu', got {self.projector_type!r}")
        if self.vision_layout not in VISION_LAYOUTS:
            raise ValueError(f"vision_layout: expected one of {VISION_LAYOUTS}, got {self.vision_layout!r}")
        if not isinstance(self.projector_pixel_shuffle, int) or self.projector_pixel_shuffle < 1:
            raise ValueError(f"projector_pixel_shuffle: expected an integer >= 1, got {self.projector_pixel_shuffle!r}")
        if self.projector_pixel_shuffle > 1 and self.vision_layout != "default":
            raise ValueError("projector_pixel_shuffle: needs vision_layout 'default' (the v1.1 layout's grid is not square)")
        if self.s2_scales is not None:
            scales = list(self.s2_scales)
            if len(scales) < 1 or scales != sorted(scales):
                raise ValueError(f"s2_scales: expected ascending image sizes, got {scales}")
            split = self.s2_split_size or scales[0]
            if any(s % split for s in scales):
                raise ValueError(f"s2_scales: every scale must be a multiple of s2_split_size={split}, got {scales}")

    @property
    def image_size(self) -> int:
        """Side of the square image the processor produces (the largest scale)."""
        if self.s2_scales:
            return max(self.s2_scales)
        return vision_input_size(self.vision_config)


def vision_input_size(vision_config: PreTrainedConfig) -> int:
    """Native input size of the vision tower (one crop)."""
    if vision_config.model_type == "timm_wrapper":
        args = vision_config.model_args or {}
        size = args.get("img_size")
        if size is None:
            raise ValueError("vision_config.model_args.img_size must be set for a timm vision tower")
        return int(size if isinstance(size, int) else size[0])
    return int(vision_config.image_size)
