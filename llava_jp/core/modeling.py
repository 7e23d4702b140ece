"""The model: vision tower -> projector -> causal LM, in transformers' VLM shape.

`LlavaJpModel` (AutoModel) returns the LM's hidden states; `LlavaJpForConditionalGeneration`
(AutoModelForImageTextToText) adds logits, the loss and generation. Both hold the same three
children (`vision_tower`, `multi_modal_projector`, `language_model` = the causal LM), so one
checkpoint loads into either; the base model runs the LM without its head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast

from .configuration import LlavaJpConfig
from .projector import build_projector, merged_tokens, pixel_shuffle
from .templates import add_image_token
from .vision import IMAGE_FEATURES, feature_width, is_trainable, tokens_per_image, unused_parameters
from .vllm_compat import servable_language_model, sparing_ignore_patterns

IGNORE_INDEX = -100
# transformers >= 5.24 calls the KV cache `cache`, earlier 5.x `past_key_values`; we pass on
# whichever name we were given and never name it ourselves (no deprecation warning on either)
_CACHE_NAMES = ("cache", "past_key_values")


def _cache_of(output) -> object:
    if not isinstance(output, dict):  # a tuple (`return_dict=False`, vLLM's Transformers backend)
        return None
    for name in _CACHE_NAMES:
        # dict's own lookup: `in` on a transformers >= 5.24 ModelOutput maps the old name onto the
        # new one and logs a deprecation warning (for a training forward, which has no cache)
        if dict.__contains__(output, name):
            return dict.__getitem__(output, name)
    return None


class LlavaJpPreTrainedModel(PreTrainedModel):
    """What both heads share: the three children, image features and their merge."""

    config: LlavaJpConfig
    config_class = LlavaJpConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # the LM's and SigLIP's attention go through transformers' ALL_ATTENTION_FUNCTIONS (vLLM's
    # Transformers backend swaps it for its own)
    _supports_attention_backend = True
    _skip_keys_device_placement = list(_CACHE_NAMES)
    # checkpoints written before the pooling head was dropped still carry it
    _keys_to_ignore_on_load_unexpected = [r"vision_tower\.head\."]

    def __init__(self, config: LlavaJpConfig, vision_tower: nn.Module | None = None, language_model: nn.Module | None = None):
        """Random weights from `config`, or already-loaded `vision_tower` / `language_model`."""
        super().__init__(config)
        if config.vision_config.model_type == "siglip_vision_model":
            config.vision_config.vision_use_head = False
        if vision_tower is None:
            vision_tower = AutoModel.from_config(config.vision_config)
        self.vision_tower = _without_pooling_head(vision_tower)
        self.multi_modal_projector = build_projector(
            config.projector_type, self.vision_feature_width * config.projector_pixel_shuffle ** 2,
            config.text_config.hidden_size,
        )
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.language_model = servable_language_model(language_model)
        self.post_init()
        self._keys_to_ignore_on_load_unexpected = sparing_ignore_patterns(
            self._keys_to_ignore_on_load_unexpected, list(self.state_dict()))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, converting models saved before `<image>` was a
        tokenizer token (config.image_token_id -200): the id becomes the one the processor gives
        `<image>` when it loads that folder's tokenizer (`add_image_token`: the next free id)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if model.config.image_token_id is None or model.config.image_token_id < 0:
            hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
            try:
                tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub)
            except (OSError, ValueError):
                return model  # no tokenizer to convert with: forward names the problem
            model.set_image_token(add_image_token(tokenizer))
        return model

    # -- sizes -----------------------------------------------------------------------------
    @property
    def num_vision_tokens(self) -> int:
        """Tokens of one image's vision features (729 for SigLIP-384, S2 or not; 728 in the v1.1 compat layout)."""
        return tokens_per_image(self.vision_tower, self.config.vision_layout)

    @property
    def vision_feature_width(self) -> int:
        """Channels of one image's vision features (the tower's width times the S2 scales)."""
        return feature_width(self.vision_tower) * max(1, len(self.config.s2_scales or []))

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

    def get_decoder(self) -> nn.Module:
        """The LM without its head (what vLLM's Transformers backend runs)."""
        return self.language_model.base_model

    def set_image_token(self, image_token_id: int) -> None:
        """Use the tokenizer's `<image>` id (`processor.image_token_id`) as the placeholder.

        Converts models saved with the old out-of-vocabulary placeholder (-200). Where the id
        has no embedding row (the LM has no spare rows), the embeddings grow as transformers'
        LLaVA grows them (`resize_token_embeddings`, new rows initialised to the mean); the row
        is never read (image features replace it). Generation never emits the token.
        """
        if image_token_id is None or image_token_id < 0:
            raise ValueError(f"image_token_id must be an in-vocabulary id, got {image_token_id}")
        if image_token_id >= self.get_input_embeddings().num_embeddings:
            self.resize_token_embeddings(image_token_id + 1, mean_resizing=True)
        ours = {self.config.image_token_id, image_token_id}  # the previous placeholder and the new one
        self.config.image_token_id = image_token_id
        generation = self.generation_config
        # `bad_words_ids` (a -inf bias built once), not `suppress_tokens`: transformers' suppress
        # processor rebuilds a vocabulary-sized mask at every token (~1.5% of a CPU decoding step)
        generation.suppress_tokens = [t for t in (generation.suppress_tokens or []) if t not in ours] or None
        generation.bad_words_ids = [w for w in (generation.bad_words_ids or []) if not (len(w) == 1 and w[0] in ours)] \
            + [[image_token_id]]

    def vision_tower_trainable(self) -> bool:
        return is_trainable(self.vision_tower, self.config.vision_feature_layer)

    def freeze_unused_vision_parameters(self) -> None:
        """Layers past the feature layer never get gradients: freeze them."""
        for p in unused_parameters(self.vision_tower, self.config.vision_feature_layer):
            p.requires_grad_(False)

    # -- pixels -> embeddings ----------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels -> vision features before the projector, (n_images, num_vision_tokens, vision_feature_width).

        This is what a feature cache stores: it depends only on the (frozen) vision tower.
        """
        tower_dtype = next(self.vision_tower.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_tower_trainable()):
            return IMAGE_FEATURES[self.config.vision_layout](
                self.vision_tower, pixel_values.to(tower_dtype), self.config.vision_feature_layer,
                self.config.s2_scales, self.config.s2_split_size,
            )

    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
        return_dict: bool = False, **kwargs
    ) -> torch.Tensor | BaseModelOutputWithPooling:
        """Pixels (or their vision features, e.g. from a feature cache) -> LM-width embeddings,
        (n_images, num_image_tokens, hidden). **Where pixels become embeddings**: the one place the
        projector runs. With `return_dict` (what vLLM's Transformers backend asks for, as for
        transformers' own VLMs) the embeddings come as `pooler_output`."""
        if vision_features is None:
            vision_features = self.encode_images(pixel_values)
        # parameters(), not [0]: PEFT wraps a fully trained projector (LoRA's modules_to_save)
        projector_dtype = next(self.multi_modal_projector.parameters()).dtype
        merged = pixel_shuffle(vision_features, self.config.projector_pixel_shuffle)
        # contiguous: vLLM swaps in its own Linear, whose CPU GEMM (oneDNN) needs a unit last stride
        embeds = self.multi_modal_projector(merged.to(projector_dtype).contiguous())
        if return_dict:
            return BaseModelOutputWithPooling(last_hidden_state=vision_features, pooler_output=embeds)
        return embeds

    def get_placeholder_mask(self, input_ids: torch.LongTensor, n_images: int) -> torch.Tensor:
        """(batch, seq) mask of the image placeholder positions, checked against the image count."""
        image_token_id = self.config.image_token_id
        if image_token_id is None or image_token_id < 0:
            raise ValueError(
                f"config.image_token_id is {image_token_id}: this model was saved by llava-jp before `<image>` "
                "became a tokenizer token; load it with its processor and call "
                "model.set_image_token(processor.image_token_id) (llava-jp's loaders do)"
            )
        mask = input_ids == image_token_id
        n_slots = int(mask.sum())
        if n_slots != n_images * self.num_image_tokens:
            raise ValueError(
                f"image placeholder tokens ({n_slots}) do not match image features ({n_images} images x "
                f"{self.num_image_tokens} tokens = {n_images * self.num_image_tokens}); the processor expands each "
                f"<image> into {self.num_image_tokens} placeholders and needs one image per <image>"
            )
        return mask

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
        embeds = self.get_input_embeddings()(input_ids)
        images = image_features if image_features is not None else pixel_values
        mask = self.get_placeholder_mask(input_ids, 0 if images is None else images.shape[0])
        if images is not None and images.shape[0]:
            projected = self.get_image_features(pixel_values, vision_features=image_features)
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), projected.to(embeds.dtype))
        elif torch.is_grad_enabled() and self.multi_modal_projector[0].weight.requires_grad:
            # training on text only: run the projector on zero images (LLaVA's `image_features[0:0]`)
            # so its weights get a zero gradient instead of none; ZeRO-3 otherwise keeps the last
            # step's gradient for weights a step's first micro-batch did not use
            first = self.multi_modal_projector[0]
            nothing = self.multi_modal_projector(embeds.new_zeros(0, first.in_features, dtype=first.weight.dtype))
            embeds = embeds + nothing.sum().to(embeds.dtype)
        return embeds

    def _decode(self, input_ids, pixel_values, image_features, inputs_embeds, **lm_kwargs):
        """The LM without its head on the merged embeddings -> its base output."""
        if inputs_embeds is None:
            if _cache_of(lm_kwargs) is not None and not (input_ids == self.config.image_token_id).any():
                # a decoding step after the prompt (generation passes the images along with the new
                # token): no placeholder, nothing to merge or count (`generate` checked the prompt)
                inputs_embeds = self.get_input_embeddings()(input_ids)
            else:
                inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features)
        return self.language_model.base_model(inputs_embeds=inputs_embeds, **lm_kwargs)


def _without_pooling_head(tower: nn.Module) -> nn.Module:
    """SigLIP's pooling head is never used (we take patch tokens): drop it, so releases and
    vLLM's Transformers backend see no unused parameters."""
    if getattr(tower.config, "model_type", None) == "siglip_vision_model":
        tower.config.vision_use_head = False
        if getattr(tower, "head", None) is not None:
            del tower.head
        if hasattr(tower, "use_head"):
            tower.use_head = False
    return tower


class LlavaJpModel(LlavaJpPreTrainedModel):
    """The VLM without a head (`AutoModel`): merged embeddings -> the LM's last hidden states."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        out = self._decode(input_ids, pixel_values, image_features, inputs_embeds,
                           attention_mask=attention_mask, **kwargs)
        return BaseModelOutputWithPast(out[0], _cache_of(out), getattr(out, "hidden_states", None),
                                       getattr(out, "attentions", None))


class LlavaJpForConditionalGeneration(LlavaJpPreTrainedModel, GenerationMixin):
    """The VLM with the LM's head (`AutoModelForImageTextToText`): logits, loss, `generate`.

    `supervised_only=True` (our trainer's path) computes logits only at supervised positions:
    a stage-1 sample has ~729 image tokens and ~30 caption tokens, and llm-jp's vocabulary has
    50688 entries (docs/benchmarks.md).
    """

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        image_features: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        supervised_only: bool = False,
        loss_reduction: str = "mean",
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Standard causal-LM forward: `logits` (batch, seq, vocab), the last `logits_to_keep`
        positions only when it is set. With `labels`, `loss` is the token-level cross entropy
        over supervised positions ("mean", or "sum" for callers that normalise across
        accumulation steps/processes themselves); with `supervised_only`, `logits` holds only
        those positions, (n_supervised, vocab), and the full logits are never computed."""
        out = self._decode(input_ids, pixel_values, image_features, inputs_embeds, attention_mask=attention_mask,
                           position_ids=position_ids, use_cache=use_cache, **kwargs)
        hidden = out[0]
        lm_head = self.get_output_embeddings()
        loss = None
        if labels is not None and supervised_only:
            targets = labels[:, 1:]
            supervised = targets != IGNORE_INDEX
            logits = lm_head(hidden[:, :-1][supervised])
            loss = F.cross_entropy(logits.float(), targets[supervised], reduction=loss_reduction)
        else:
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            logits = lm_head(hidden[:, keep])
            if labels is not None:
                if logits_to_keep:
                    raise ValueError("labels need the logits at every position; do not pass logits_to_keep")
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX, reduction=loss_reduction)
        return CausalLMOutputWithPast(loss, logits, _cache_of(out))

    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, image_features=None, **kwargs):
        """Generate from a processed prompt; returns the prompt followed by the new tokens.

        Image features are merged in the first forward (the prompt), then decoding runs on the
        LM's KV cache. Works with left-padded batches (positions follow the attention mask).
        Runs under `torch.inference_mode` (no autograd bookkeeping per operation: ~2-3% faster
        decoding than `no_grad` on CPU, docs/benchmarks.md); returned token tensors are ordinary
        tensors.
        """
        if input_ids is not None:
            images = image_features if image_features is not None else pixel_values
            self.get_placeholder_mask(input_ids, 0 if images is None else images.shape[0])
        extra = {k: v for k, v in (("pixel_values", pixel_values), ("image_features", image_features)) if v is not None}
        with torch.inference_mode():
            out = super().generate(input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs)
        return out.clone() if isinstance(out, torch.Tensor) else out
