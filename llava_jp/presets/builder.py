"""Presets (YAML data) -> model and processor, from hub ids / local paths or random weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    SiglipImageProcessor,
)

from llava_jp.core.configuration import LlavaJpConfig
from llava_jp.core.modeling import LlavaJpForConditionalGeneration
from llava_jp.core.processing import LlavaJpProcessor
from llava_jp.core.templates import add_image_token, get_template
from llava_jp.errors import UserError, closest, loading, read_yaml
from llava_jp.presets.tokenizers import build_bpe_tokenizer, build_char_tokenizer

PRESET_DIR = Path(__file__).parent
BUILTIN_TOKENIZERS = {"builtin:char-ja": build_char_tokenizer, "builtin:bpe-ja": build_bpe_tokenizer}


@dataclass
class VisionSpec:
    name_or_path: str | None = None
    config: dict = field(default_factory=dict)
    feature_layer: int = -2
    s2_scales: list[int] | None = None
    s2_split_size: int | None = None


@dataclass
class LanguageModelSpec:
    name_or_path: str | None = None
    config: dict = field(default_factory=dict)


@dataclass
class Preset:
    """A model recipe: which vision tower, projector, LM, tokenizer and template."""

    vision: VisionSpec
    language_model: LanguageModelSpec
    tokenizer: str
    projector: str = "mlp2x_gelu"
    projector_pixel_shuffle: int = 1  # 2: 2x2 image tokens merged before the projector (729 -> 196)
    template: str = "llm-jp-v1"
    pad_to_square: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    resize_token_embeddings: bool = False


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**data)


def parse_preset(data: dict, source: str = "preset") -> Preset:
    """Validate a preset mapping once, with errors that name the field."""
    data = dict(data)
    for key in ("vision", "language_model", "tokenizer"):
        if key not in data:
            raise UserError(f"{source}: missing field {key!r}")
    data["vision"] = _from_dict(VisionSpec, data["vision"], f"{source}: vision")
    data["language_model"] = _from_dict(LanguageModelSpec, data["language_model"], f"{source}: language_model")
    preset = _from_dict(Preset, data, source)
    try:
        get_template(preset.template)
    except ValueError as err:
        raise UserError(f"{source}: template: {err}") from None
    for spec, where in ((preset.vision, "vision"), (preset.language_model, "language_model")):
        if spec.name_or_path is None and "model_type" not in spec.config:
            raise UserError(f"{source}: {where} needs name_or_path or a config with model_type")
    return preset


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path) -> Preset:
    """A bundled preset by name (see `preset_names()`), or a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise UserError(f"unknown preset {str(name_or_path)!r}; bundled: {', '.join(preset_names())}"
                            + closest(str(name_or_path), preset_names()))
    return parse_preset(read_yaml(path, "preset"), source=str(path))


# -- pieces ----------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str):
    if name_or_path in BUILTIN_TOKENIZERS:
        return BUILTIN_TOKENIZERS[name_or_path]()
    with loading(name_or_path, "tokenizer"):
        return AutoTokenizer.from_pretrained(name_or_path)


def _config_from_dict(config: dict) -> PreTrainedConfig:
    config = dict(config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def _vision_config(spec: VisionSpec, pretrained: bool) -> PreTrainedConfig:
    if pretrained and spec.name_or_path:
        with loading(spec.name_or_path, "vision name_or_path"):
            config = AutoConfig.from_pretrained(spec.name_or_path)
        # a full SigLIP/CLIP checkpoint carries text and vision; we want the vision half
        return getattr(config, "vision_config", None) or config
    return _config_from_dict(spec.config)


def _load_vision_tower(spec: VisionSpec, config: PreTrainedConfig, dtype):
    model_class = AutoModel._model_mapping[type(config)]
    return model_class.from_pretrained(spec.name_or_path, config=config, dtype=dtype)


def build_config(preset: Preset, pretrained: bool = False, tokenizer=None) -> LlavaJpConfig:
    """The `LlavaJpConfig` a preset describes (no weights touched).

    A randomly initialised LM takes its vocabulary size and special token ids from the
    tokenizer unless the preset's config sets them; a given tokenizer gets `<image>` first.
    """
    image_token_id = add_image_token(tokenizer) if tokenizer is not None else None
    lm = preset.language_model
    if pretrained and lm.name_or_path:
        with loading(lm.name_or_path, "language_model name_or_path"):
            text_config = AutoConfig.from_pretrained(lm.name_or_path)
    else:
        cfg = dict(lm.config)
        if tokenizer is not None:
            cfg.setdefault("vocab_size", len(tokenizer))
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                cfg.setdefault(name, getattr(tokenizer, name))
        text_config = _config_from_dict(cfg)
    return LlavaJpConfig(
        vision_config=_vision_config(preset.vision, pretrained),
        text_config=text_config,
        vision_feature_layer=preset.vision.feature_layer,
        s2_scales=preset.vision.s2_scales,
        s2_split_size=preset.vision.s2_split_size,
        projector_type=preset.projector,
        projector_pixel_shuffle=preset.projector_pixel_shuffle,
        image_token_id=image_token_id,
    )


def build_processor(preset: Preset, config: LlavaJpConfig, tokenizer, num_image_tokens: int) -> LlavaJpProcessor:
    size = config.image_size
    image_processor = SiglipImageProcessor(
        size={"height": size, "width": size},
        image_mean=list(preset.image_mean),
        image_std=list(preset.image_std),
    )
    return LlavaJpProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        template=preset.template,
        num_image_tokens=num_image_tokens,
        pad_to_square=preset.pad_to_square,
    )


def build(
    preset: Preset | str,
    pretrained: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaJpForConditionalGeneration, LlavaJpProcessor]:
    """Build (model, processor) for a preset.

    pretrained=True loads the vision tower, LM and tokenizer from their hub ids / local paths
    (components without a `name_or_path` get random weights); pretrained=False builds
    everything from the preset's configs with random weights and downloads nothing except the
    tokenizer (the LM's own tokenizer defines the vocabulary). Weights come in `dtype`, never
    in the dtype a pretrained part's config names (transformers 5's default).
    """
    if isinstance(preset, str):
        preset = load_preset(preset)
    tokenizer = load_tokenizer(preset.tokenizer)
    own_tokens = len(tokenizer)
    image_token_id = add_image_token(tokenizer)
    config = build_config(preset, pretrained=pretrained, tokenizer=tokenizer)
    vision_tower = language_model = None
    if pretrained and preset.vision.name_or_path:
        vision_tower = _load_vision_tower(preset.vision, config.vision_config, dtype)
    if pretrained and preset.language_model.name_or_path:
        with loading(preset.language_model.name_or_path, "language_model name_or_path"):
            language_model = AutoModelForCausalLM.from_pretrained(preset.language_model.name_or_path, dtype=dtype)
    model = LlavaJpForConditionalGeneration(config, vision_tower=vision_tower, language_model=language_model)
    model = model.to(dtype)
    vocab = model.get_input_embeddings().num_embeddings
    if own_tokens > vocab:
        if not preset.resize_token_embeddings:
            raise ValueError(
                f"tokenizer has {own_tokens} tokens but the LM's embedding has {vocab} rows; "
                "set resize_token_embeddings: true in the preset to grow it"
            )
        model.resize_token_embeddings(own_tokens)
    _set_generation_tokens(model, tokenizer)
    # `<image>` takes a spare embedding row when the LM has one (llm-jp-1.3b), else one more row
    model.set_image_token(image_token_id)
    processor = build_processor(preset, config, tokenizer, model.num_image_tokens)
    return model, processor


def _set_generation_tokens(model: LlavaJpForConditionalGeneration, tokenizer) -> None:
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id


def count_parameters(preset: Preset | str | None = None, model: LlavaJpForConditionalGeneration | None = None) -> dict:
    """Parameter counts per component of a preset (built on the meta device, no weights
    allocated) or of a given model. The vision tower is counted as released, i.e. with its
    unused last layer (its pooling head is not part of the model).
    """
    if model is None:
        if isinstance(preset, str):
            preset = load_preset(preset)
        tokenizer = None
        if preset.tokenizer in BUILTIN_TOKENIZERS or "vocab_size" not in preset.language_model.config:
            tokenizer = load_tokenizer(preset.tokenizer)
        config = build_config(preset, pretrained=False, tokenizer=tokenizer)
        with torch.device("meta"):
            model = LlavaJpForConditionalGeneration(config)
    config = model.config

    def n(module) -> int:
        return sum(p.numel() for p in module.parameters())

    counts = {
        "vision": n(model.vision_tower),
        "projector": n(model.multi_modal_projector),
        "language_model": n(model.language_model),
    }
    counts["total"] = sum(counts.values())
    return {
        "parameters": counts,
        "total_billions": round(counts["total"] / 1e9, 3),
        "total_human": f"{counts['total'] / 1e9:.2f}B",
        "image_tokens_per_image": model.num_image_tokens,
        "projector_input_width": model.projector_input_width,
        "image_size": config.image_size,
        "s2_scales": config.s2_scales,
    }
