"""`LlavaJpForConditionalGeneration`: vision tower -> projector -> causal LM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import vision
from .configuration import LlavaJpConfig
from .projector import build_projector, merged_tokens, pixel_shuffle

IGNORE_INDEX = -100


class LlavaJpForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """A LLaVA-style VLM: image features replace the image placeholder tokens' embeddings.

    With `labels`, logits are computed only at supervised positions (a stage-1 sample has ~729
    image tokens and ~30 caption tokens, and llm-jp's vocabulary has 50688 entries).
    """

    config: LlavaJpConfig
    config_class = LlavaJpConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: LlavaJpConfig, vision_tower: nn.Module | None = None, language_model: nn.Module | None = None):
        """Random weights from `config`, or already-loaded `vision_tower` / `language_model`."""
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_projector(
            config.projector_type, self.vision_feature_width * config.projector_pixel_shuffle ** 2,
            config.text_config.hidden_size,
        )
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = language_model
        self.post_init()

    # -- sizes -----------------------------------------------------------------------------
    @property
    def num_vision_tokens(self) -> int:
        """Tokens of one image's vision features (729 for SigLIP-384, S2 or not; 728 in the v1.1 compat layout)."""
        return vision.tokens_per_image(self.vision_tower, self.config.vision_layout)

    @property
    def vision_feature_width(self) -> int:
        """Channels of one image's vision features (the tower's width times the S2 scales)."""
        return vision.feature_width(self.vision_tower) * max(1, len(self.config.s2_scales or []))

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image becomes in the LM: the vision tokens, fewer after a pixel shuffle."""
        return merged_tokens(self.num_vision_tokens, self.config.projector_pixel_shuffle) \
            if self.config.projector_pixel_shuffle > 1 else self.num_vision_tokens

    @property
    def projector_input_width(self) -> int:
        return self.multi_modal_projector[0].in_features

    # -- embeddings --------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def vision_tower_trainable(self) -> bool:
        return vision.is_trainable(self.vision_tower, self.config.vision_feature_layer)

    def freeze_unused_vision_parameters(self) -> None:
        """Layers past the feature layer and the pooling head never get gradients: freeze them."""
        for p in vision.unused_parameters(self.vision_tower, self.config.vision_feature_layer):
            p.requires_grad_(False)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels -> vision features before the projector, (n_images, num_vision_tokens, vision_feature_width).

        This is what a feature cache stores: it depends only on the (frozen) vision tower.
        """
        tower_dtype = next(self.vision_tower.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_tower_trainable()):
            return vision.IMAGE_FEATURES[self.config.vision_layout](
                self.vision_tower, pixel_values.to(tower_dtype), self.config.vision_feature_layer,
                self.config.s2_scales, self.config.s2_split_size,
            )

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pixels (or their vision features, e.g. from a feature cache) -> LM-width embeddings,
        (n_images, num_image_tokens, hidden). The one place the projector runs."""
        if vision_features is None:
            vision_features = self.encode_images(pixel_values)
        projector_dtype = self.multi_modal_projector[0].weight.dtype
        merged = pixel_shuffle(vision_features, self.config.projector_pixel_shuffle)
        return self.multi_modal_projector(merged.to(projector_dtype))

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every image placeholder replaced by image features, in order.

        `image_features` (vision features before the projector, as `encode_images` returns them)
        may be given instead of `pixel_values`, e.g. from a feature cache. Text-only inputs never
        run the vision tower.
        """
        is_image = input_ids == self.config.image_token_id
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        n_slots = int(is_image.sum())
        images = image_features if image_features is not None else pixel_values
        n_images = 0 if images is None else images.shape[0]
        if n_slots and n_slots != n_images * self.num_image_tokens:
            raise ValueError(
                f"image placeholder tokens ({n_slots}) do not match image features ({n_images} images x "
                f"{self.num_image_tokens} tokens = {n_images * self.num_image_tokens}); the processor expands each "
                f"<image> into {self.num_image_tokens} placeholders and needs one image per <image>"
            )
        if n_slots:
            projected = self.get_image_features(pixel_values, vision_features=image_features)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), projected.to(embeds.dtype))
        elif torch.is_grad_enabled() and self.multi_modal_projector[0].weight.requires_grad:
            # training on text only: run the projector on zero images (LLaVA's `image_features[0:0]`)
            # so its weights get a zero gradient instead of none; ZeRO-3 otherwise keeps the last
            # step's gradient for weights a step's first micro-batch did not use
            first = self.multi_modal_projector[0]
            nothing = self.multi_modal_projector(embeds.new_zeros(0, first.in_features, dtype=first.weight.dtype))
            embeds = embeds + nothing.sum().to(embeds.dtype)
        return embeds

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        image_features: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        loss_reduction: str = "mean",
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Standard causal-LM forward. With `labels`, the loss is the token-level cross entropy
        over supervised positions ("mean", or "sum" for callers that normalise across
        accumulation steps/processes themselves) and `logits` holds only those positions."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features)
        backbone = self.language_model.base_model
        out = backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out[0]
        lm_head = self.get_output_embeddings()
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            supervised = targets != IGNORE_INDEX
            logits = lm_head(hidden[:, :-1][supervised])
            loss = F.cross_entropy(logits.float(), targets[supervised], reduction=loss_reduction)
        else:
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            logits = lm_head(hidden[:, keep])
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=getattr(out, "past_key_values", None),
        )

    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_features=None, **kwargs):
        """Generate from a processed prompt; returns only the new tokens.

        Image features are merged once, then decoding runs on the LM's KV cache. Works with
        left-padded batches (positions follow the attention mask). Runs under
        `torch.inference_mode` (no autograd bookkeeping per operation: ~2-3% faster decoding
        than `no_grad` on CPU, docs/benchmarks.md); returned token tensors are ordinary tensors.
        """
        with torch.inference_mode():
            if input_ids is None:
                out = super().generate(attention_mask=attention_mask, **kwargs)
            else:
                inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features)
                if attention_mask is None:
                    attention_mask = torch.ones_like(input_ids)
                out = super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return out.clone() if isinstance(out, torch.Tensor) else out
