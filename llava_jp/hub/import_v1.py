"""`llava-jp import-llava-jp`: convert a checkpoint of the predecessor (LLaVA-JP v1.x,
`LlavaGpt2ForCausalLM`, e.g. `toshi456/llava-jp-1.3b-v1.1`) into our format.

The converted model keeps what the checkpoint was trained on: the `llava-jp-v1.1-compat` vision
layout (728 tokens on a 26x28 grid, see `vision.image_features_llava_jp_v1_1`) and prompt
layout (see `LlavaJpProcessor`), the predecessor's image size and square resizing, and its PIL
resizing (transformers 4.x image processors; `image_backend: pil`, kept across save/load).
Weights are renamed, never changed: the predecessor saved its tower in bf16 next to an fp32 LM,
and the import holds all of them in float32 (exact for both). The tower's keys carry the
`vision_model.` level that transformers < 5.6 had; they are fitted to the installed SigLIP's
layout. Pickles are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    PreTrainedConfig,
    SiglipImageProcessor,
    SiglipVisionModel,
)

from llava_jp.infer.load import save_model
from llava_jp.presets.builder import _set_generation_tokens
from llava_jp.core.configuration import LlavaJpConfig
from llava_jp.core.modeling import LlavaJpForConditionalGeneration
from llava_jp.core.processing import LlavaJpProcessor
from llava_jp.core.vision import LLAVA_JP_V1_1_LAYOUT
from llava_jp.errors import OFFLINE_HINT, UserError, looks_like_path

PREDECESSOR_ARCHITECTURE = "LlavaGpt2ForCausalLM"
PREDECESSOR_MODEL_TYPES = ("llava-jp", "llava")
# What the predecessor added to the LM's GPT2Config; the rest of its config.json is the LM's.
PREDECESSOR_FIELDS = {
    "architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
    "mm_vision_tower", "scales", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_projector_type", "mm_hidden_size", "use_mm_proj", "image_aspect_ratio",
    "tokenizer_padding_side", "tokenizer_model_max_length", "tune_mm_mlp_adapter",
    "vision_encoder_type", "pretrain_mm_mlp_adapter", "vision_tower",
}
# predecessor key prefix -> ours
KEY_PREFIXES = {
    "transformer.": "language_model.transformer.",
    "lm_head.": "language_model.lm_head.",
    "model.vision_tower.vision_tower.": "vision_tower.",
    "model.mm_projector.": "multi_modal_projector.",
}
# causal-mask buffers that older transformers versions saved with GPT-2 weights
STALE_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
STAGE1_PROJECTOR_FILE = "mm_projector.bin"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


# -- reading the predecessor's files ---------------------------------------------------------
def resolve_source(src: str) -> Path:
    """A local directory, or a hub id downloaded with `huggingface_hub`."""
    path = Path(src)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    if looks_like_path(src) or path.exists():
        raise UserError(f"--src {src!r}: " + ("not a folder" if path.exists() else "no such folder"))

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", STAGE1_PROJECTOR_FILE]
    try:
        path = Path(snapshot_download(src, allow_patterns=patterns))
        if not any((path / name).exists() for name in (*WEIGHT_FILES, STAGE1_PROJECTOR_FILE)):
            path = Path(snapshot_download(src, allow_patterns=[*patterns, "*.bin"]))  # pickles only if needed
        return path
    except Exception as error:  # noqa: BLE001 -- whatever the hub client raised, said in one line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"--src {src!r}: not a local folder, and the hub could not serve it ({first}); "
                        f"{OFFLINE_HINT}") from None


def read_predecessor_config(path: Path) -> dict:
    """config.json of a predecessor checkpoint, checked for the fields the conversion relies on."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise UserError(f"{path}: no config.json")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("model_type") not in PREDECESSOR_MODEL_TYPES:
        raise UserError(f"{config_file}: model_type {config.get('model_type')!r} is not a predecessor checkpoint "
                         f"(expected one of {PREDECESSOR_MODEL_TYPES})")
    architectures = config.get("architectures") or [PREDECESSOR_ARCHITECTURE]
    # its stage 1 saves the config before any model save, so it still names the LM's class
    if PREDECESSOR_ARCHITECTURE not in architectures and "GPT2LMHeadModel" not in architectures:
        raise UserError(f"{config_file}: architectures {architectures}: only {PREDECESSOR_ARCHITECTURE} "
                         "(the GPT-2 / llm-jp variant) can be imported")
    for field in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size"):
        if field not in config:
            raise UserError(f"{config_file}: missing field {field!r}")
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise UserError(f"{config_file}: mm_vision_select_feature {feature!r}: only 'patch' can be imported")
    scales = config.get("scales")
    if scales is not None and (list(scales) != sorted(scales, reverse=True) or not all(0 < s <= 1 for s in scales)):
        raise UserError(f"{config_file}: scales {scales}: expected fractions of the input size, larger first")
    return config


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"{file}: holds more than tensors; refusing to unpickle it ({error})") from error


def _load_weight_file(file: Path) -> dict[str, torch.Tensor]:
    return load_file(file) if file.suffix == ".safetensors" else _load_pickle(file)


def load_predecessor_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (single file or sharded), or of a stage-1 `mm_projector.bin`."""
    for name in WEIGHT_FILES:
        file = path / name
        if not file.exists():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(file.read_text(encoding="utf-8"))["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_load_weight_file(path / shard))
            return state
        return _load_weight_file(file)
    if (path / STAGE1_PROJECTOR_FILE).exists():
        return _load_pickle(path / STAGE1_PROJECTOR_FILE)
    raise UserError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)}, {STAGE1_PROJECTOR_FILE})")


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Predecessor keys -> ours. Unknown keys are an error, so nothing is dropped silently."""
    converted, unknown = {}, []
    for key, tensor in state.items():
        if STALE_BUFFERS.match(key):
            continue
        prefix = next((p for p in KEY_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
            continue
        converted[KEY_PREFIXES[prefix] + key[len(prefix):]] = tensor
    if unknown:
        raise UserError(f"unknown predecessor weights (not LM, vision tower or projector): {unknown[:10]}")
    return converted


# -- building our model ----------------------------------------------------------------------
def vision_config_for(name_or_path: str) -> PreTrainedConfig:
    """The vision tower's config (the vision half of a full SigLIP config)."""
    config = AutoConfig.from_pretrained(name_or_path)
    config = getattr(config, "vision_config", None) or config
    if config.model_type != "siglip_vision_model":
        raise UserError(f"vision tower {name_or_path!r} is {config.model_type!r}; only SigLIP towers can be imported")
    config._name_or_path = str(name_or_path)
    return config


def build_config(predecessor: dict, vision_config: PreTrainedConfig, text_config: PreTrainedConfig,
                 image_size: int | None = None) -> LlavaJpConfig:
    """Our config for a predecessor config: S2 sizes in pixels, the v1.1 compat vision layout.

    The predecessor stored S2 scales as fractions of an input size it did not record; the
    smallest scale is one crop of the tower, which gives the input size (768 for v1.1).
    """
    scales = predecessor.get("scales")
    split = int(vision_config.image_size)
    if scales:
        image_size = image_size or round(split / min(scales))
        s2_scales = sorted(int(image_size * s) for s in scales)
    else:
        s2_scales = None
    width = vision_config.hidden_size * max(1, len(scales or []))
    if predecessor["mm_hidden_size"] != width:
        raise UserError(f"mm_hidden_size {predecessor['mm_hidden_size']} does not match the vision tower "
                         f"(hidden {vision_config.hidden_size} x {max(1, len(scales or []))} scales = {width})")
    return LlavaJpConfig(
        vision_config=vision_config,
        text_config=text_config,
        vision_feature_layer=predecessor.get("mm_vision_select_layer", -2),
        s2_scales=s2_scales,
        s2_split_size=split if s2_scales else None,
        projector_type=predecessor["mm_projector_type"],
        vision_layout=LLAVA_JP_V1_1_LAYOUT,
    )


def _text_config(predecessor: dict) -> GPT2Config:
    fields = {k: v for k, v in predecessor.items() if k not in PREDECESSOR_FIELDS}
    config = GPT2Config(**fields)
    config._name_or_path = predecessor.get("_name_or_path", "")
    return config


TOWER_LEVEL = "vision_model."  # SiglipVisionModel's inner level before transformers 5.6


def fit_tower_layout(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tower keys with or without the `vision_model.` level, as the installed SigLIP names them."""
    expected = set(model.state_dict())
    fitted = {}
    for key, tensor in state.items():
        if key.startswith("vision_tower.") and key not in expected:
            rest = key[len("vision_tower."):]
            other = rest[len(TOWER_LEVEL):] if rest.startswith(TOWER_LEVEL) else TOWER_LEVEL + rest
            if "vision_tower." + other in expected:
                key = "vision_tower." + other
        fitted[key] = tensor
    return fitted


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], expect_all: bool) -> None:
    state = fit_tower_layout(state, model)
    # SigLIP's pooling head is never used and not part of the model (with or without `vision_model.`)
    state = {k: v for k, v in state.items() if not re.match(r"vision_tower\.(vision_model\.)?head\.", k)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if model.config.text_config.tie_word_embeddings:
        missing = [k for k in missing if k != "language_model.lm_head.weight"]
    if unexpected or (expect_all and missing):
        raise UserError(f"checkpoint does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")


def _image_processor(vision_name: str, size: int) -> SiglipImageProcessor:
    """The tower's own preprocessing (mean/std, resampling) at the predecessor's input size.
    Resizing runs on PIL (`image_backend="pil"` on the processor), as transformers 4.x did:
    torchvision's bicubic gives other pixels. Tiny local towers may have no preprocessing file."""
    settings = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    try:
        tower_processor = AutoImageProcessor.from_pretrained(vision_name)
        settings = {k: v for k, v in tower_processor.to_dict().items()
                    if k in ("image_mean", "image_std", "resample", "rescale_factor", "do_normalize", "do_rescale")}
    except (OSError, ValueError):
        pass
    return SiglipImageProcessor(**settings, size={"height": size, "width": size})


def _load_tokenizer(path: Path, override: str | None, predecessor: dict, language_model: str | None = None):
    """--tokenizer, else the checkpoint's own (stage 2 saves it), else the LM's: a stage-1 folder
    has none, and the LM the user named for it is the one its tokenizer belongs to."""
    if override:
        return AutoTokenizer.from_pretrained(override)
    if (path / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(path)
    name = language_model or predecessor.get("_name_or_path")
    if not name:
        raise UserError(f"{path}: no tokenizer files and no _name_or_path in config.json; pass --tokenizer")
    return AutoTokenizer.from_pretrained(name)


def convert(
    src: str,
    out: str | Path,
    vision_tower: str | None = None,
    language_model: str | None = None,
    tokenizer: str | None = None,
    image_size: int | None = None,
) -> tuple[LlavaJpForConditionalGeneration, LlavaJpProcessor]:
    """Convert a predecessor checkpoint (full, or stage-1 `mm_projector.bin`) and save it to `out`.

    vision_tower: where the tower's config (and, for stage 1, weights) come from; default the
        checkpoint's `mm_vision_tower` hub id.
    language_model: stage 1 only: the LM's weights; default the checkpoint's `_name_or_path`.
    """
    path = resolve_source(src)
    predecessor = read_predecessor_config(path)
    vision_name = vision_tower or predecessor["mm_vision_tower"]
    state = convert_state_dict(load_predecessor_weights(path))
    stage1 = not any(k.startswith("language_model.") for k in state)
    if stage1:
        lm_name = language_model or predecessor.get("_name_or_path")
        if not lm_name:
            raise UserError(f"{path}: a stage-1 projector needs the LM; pass --language-model")
        lm = AutoModelForCausalLM.from_pretrained(lm_name, dtype=torch.float32)
        vision_config = vision_config_for(vision_name)
        tower = SiglipVisionModel.from_pretrained(vision_name, config=vision_config, dtype=torch.float32)
        config = build_config(predecessor, vision_config, lm.config, image_size)
        model = LlavaJpForConditionalGeneration(config, vision_tower=tower, language_model=lm)
    else:
        config = build_config(predecessor, vision_config_for(vision_name), _text_config(predecessor), image_size)
        model = LlavaJpForConditionalGeneration(config).to(torch.float32)
    _load_into(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, expect_all=not stage1)
    tok = _load_tokenizer(path, tokenizer, predecessor, language_model)
    _set_generation_tokens(model, tok)
    processor = LlavaJpProcessor(
        image_processor=_image_processor(vision_name, config.image_size),
        tokenizer=tok,
        template="llm-jp-v1",
        num_image_tokens=model.num_image_tokens,
        pad_to_square=predecessor.get("image_aspect_ratio", "square") == "pad",
        prompt_layout=LLAVA_JP_V1_1_LAYOUT,
        image_backend="pil",
    )
    model.set_image_token(processor.image_token_id)
    save_model(model, processor, out, torch.float32)
    return model.eval(), processor


# -- CLI -------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="predecessor checkpoint: local directory or hub id")
    parser.add_argument("--out", required=True, help="directory for the converted model")
    parser.add_argument("--vision-tower", help="SigLIP directory or hub id (default: the checkpoint's mm_vision_tower)")
    parser.add_argument("--language-model", help="stage-1 checkpoints: the LM (default: the checkpoint's _name_or_path)")
    parser.add_argument("--tokenizer", help="tokenizer (default: the checkpoint's own, else --language-model, else its _name_or_path)")
    parser.add_argument("--image-size", type=int, help="input size (default: tower size / smallest S2 scale, 768 for v1.1)")


def run(args: argparse.Namespace) -> int:
    model, processor = convert(args.src, args.out, args.vision_tower, args.language_model, args.tokenizer, args.image_size)
    summary = {
        "out": str(args.out),
        "vision_layout": model.config.vision_layout,
        "image_size": model.config.image_size,
        "s2_scales": model.config.s2_scales,
        "image_tokens_per_image": model.num_image_tokens,
        "prompt_layout": processor.prompt_layout,
    }
    print(json.dumps(summary, ensure_ascii=False, indent=2))
    return 0
