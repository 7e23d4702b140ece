"""A tiny LLaVA-JP v1.1 checkpoint, written file for file the way the predecessor's own code
wrote `toshi456/llava-jp-1.3b-v1.1` (tosiyuki/LLaVA-JP v1.1.0, April 2024, transformers 4.40).

Why by hand: a stand-in written by today's transformers has today's key names and dtypes, and
that hid two import bugs (the tower's `vision_model.` level, PIL resizing). So nothing here goes
through transformers' model classes: every key, shape, dtype and JSON field is spelled out as
the predecessor's code and transformers 4.40 produce them (checked against a run of that code).

What its `train_llava.py` does, and what is written here:
- stage 1 (`scripts/pretrain/..._v1.1.sh`, `--tune_mm_mlp_adapter True`): the LM
  (`LlavaGpt2ForCausalLM.from_pretrained(llm-jp/llm-jp-1.3b-v1.0)`, float32) and the SigLIP tower;
  only the projector trains. `safe_save_model_for_hf_trainer` then writes `config.json`
  (`model.config.save_pretrained`: the LM's config, so `architectures` still names
  `GPT2LMHeadModel` and `torch_dtype` is the LM's) and `mm_projector.bin`
  (`torch.save` of the `model.mm_projector.*` parameters, float32).
- stage 2 (`scripts/finetune/..._v1.1.sh`, `--bf16 True`): the same LM again, the projector from
  stage 1's `mm_projector.bin`, the tower cast to bfloat16 (`vision_tower.to(dtype=torch.bfloat16)`)
  and frozen; LM and projector train in float32 under autocast. `Trainer._save` writes
  `save_pretrained(safe_serialization=True)` of the whole state dict: `transformer.*`,
  `lm_head.weight` (untied) and `model.mm_projector.*` in float32,
  `model.vision_tower.vision_tower.vision_model.*` (pooling head included) in bfloat16, in
  transformers 4.40's 5 GB shards (the 1.86B-parameter release does not fit one), plus the
  tokenizer (loaded with `model_max_length=1532`, `padding_side="right"`, pad = unk) and
  `training_args.bin`.
- its inputs as published: `google/siglip-so400m-patch14-384` (a full `SiglipModel`, vision and
  text towers, 4.x key names) and `llm-jp/llm-jp-1.3b-v1.0` (`GPT2LMHeadModel`, float16).

Sizes are tiny: tower 32 px, patch 8 (16 patches; the predecessor drops the first, keeping 15),
hidden 32; S2 scales [1.0, 0.5] make the input 64 px; LM width 32, 2 layers.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

TRANSFORMERS_VERSION = "4.40.2"
SIGLIP_ID = "google/siglip-so400m-patch14-384"
LM_ID = "llm-jp/llm-jp-1.3b-v1.0"
SYSTEM = "これは好奇心旺盛なユーザーと人工知能システムのチャットです。システムはユーザーの質問に親切、詳細、丁寧に答える。"
PAD, UNK, EOD = "<pad>", "<unk>", "<EOD|LLM-jp>"

VISION = {"hidden_size": 32, "image_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
          "num_hidden_layers": 3, "patch_size": 8}
TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
        "vocab_size": 64, "max_position_embeddings": 16}
SCALES = [1.0, 0.5]
LM = {"n_embd": 32, "n_head": 2, "n_layer": 2, "n_positions": 512}
# transformers 4.40's GPT2Config fields beyond PretrainedConfig's, with their defaults: its
# `to_diff_dict` writes every one of them (they are not PretrainedConfig keys)
GPT2_FIELDS = {
    "activation_function": "gelu_new", "attn_pdrop": 0.1, "embd_pdrop": 0.1, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "n_inner": None, "reorder_and_upcast_attn": False, "resid_pdrop": 0.1,
    "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True, "summary_activation": None,
    "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
    "summary_use_proj": True, "use_cache": True,
}


@dataclass
class PredecessorCheckpoint:
    """Where each part was written."""

    siglip: Path  # the tower as published (`--vision-tower`)
    lm: Path  # the LM as published (`--language-model`)
    stage1: Path  # config.json + mm_projector.bin
    stage2: Path  # the released checkpoint
    image: Path  # a photo to ask about


def probe_image() -> Image.Image:
    """Not square and not a multiple of the input size, so how it is resized matters."""
    image = Image.merge("RGB", [Image.linear_gradient("L"), Image.radial_gradient("L"),
                                Image.linear_gradient("L").rotate(90)]).resize((97, 61))
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 8, 50, 30], fill=(230, 20, 20))
    draw.ellipse([48, 30, 90, 58], fill=(20, 60, 220))
    return image


# -- key names and shapes (transformers 4.x module layout) ------------------------------------
def _encoder_layer(prefix: str, hidden: int, inner: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for norm in ("layer_norm1", "layer_norm2"):
        shapes |= {f"{prefix}{norm}.weight": (hidden,), f"{prefix}{norm}.bias": (hidden,)}
    shapes |= {f"{prefix}mlp.fc1.weight": (inner, hidden), f"{prefix}mlp.fc1.bias": (inner,),
               f"{prefix}mlp.fc2.weight": (hidden, inner), f"{prefix}mlp.fc2.bias": (hidden,)}
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        shapes |= {f"{prefix}self_attn.{proj}.weight": (hidden, hidden), f"{prefix}self_attn.{proj}.bias": (hidden,)}
    return shapes


def siglip_vision_shapes(v: dict = VISION) -> dict[str, tuple[int, ...]]:
    """`SiglipVisionTransformer` (4.x): embeddings, encoder, post_layernorm, pooling head."""
    h, inner = v["hidden_size"], v["intermediate_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    shapes = {"embeddings.patch_embedding.weight": (h, 3, v["patch_size"], v["patch_size"]),
              "embeddings.patch_embedding.bias": (h,), "embeddings.position_embedding.weight": (patches, h)}
    for i in range(v["num_hidden_layers"]):
        shapes |= _encoder_layer(f"encoder.layers.{i}.", h, inner)
    shapes |= {"post_layernorm.weight": (h,), "post_layernorm.bias": (h,), "head.probe": (1, 1, h),
               "head.attention.in_proj_weight": (3 * h, h), "head.attention.in_proj_bias": (3 * h,),
               "head.attention.out_proj.weight": (h, h), "head.attention.out_proj.bias": (h,),
               "head.layernorm.weight": (h,), "head.layernorm.bias": (h,),
               "head.mlp.fc1.weight": (inner, h), "head.mlp.fc1.bias": (inner,),
               "head.mlp.fc2.weight": (h, inner), "head.mlp.fc2.bias": (h,)}
    return shapes


def siglip_text_shapes(t: dict = TEXT) -> dict[str, tuple[int, ...]]:
    h, inner = t["hidden_size"], t["intermediate_size"]
    shapes = {"embeddings.token_embedding.weight": (t["vocab_size"], h),
              "embeddings.position_embedding.weight": (t["max_position_embeddings"], h)}
    for i in range(t["num_hidden_layers"]):
        shapes |= _encoder_layer(f"encoder.layers.{i}.", h, inner)
    return shapes | {"final_layer_norm.weight": (h,), "final_layer_norm.bias": (h,),
                     "head.weight": (h, h), "head.bias": (h,)}


def gpt2_shapes(vocab: int, lm: dict = LM) -> dict[str, tuple[int, ...]]:
    """`GPT2LMHeadModel` in module order (GPT-2's Conv1D weights are stored (in, out))."""
    d = lm["n_embd"]
    shapes = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (lm["n_positions"], d)}
    for i in range(lm["n_layer"]):
        p = f"transformer.h.{i}."
        shapes |= {p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                   p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                   p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                   p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                   p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
                   p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,)}
    return shapes | {"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,), "lm_head.weight": (vocab, d)}


def projector_shapes(mm_hidden: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """`mlp2x_gelu`: nn.Sequential(Linear, GELU, Linear) -> indices 0 and 2."""
    return {"0.weight": (hidden, mm_hidden), "0.bias": (hidden,), "2.weight": (hidden, hidden), "2.bias": (hidden,)}


def _random(shapes: dict[str, tuple[int, ...]], generator: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    """Norm weights near 1, everything else N(0, std): large enough that answers depend on the image."""
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=generator)
        norm_weight = name.endswith("weight") and any(n in name for n in ("norm", "ln_"))
        out[name] = 1 + 0.1 * t if norm_weight else std * t
    return out


# -- files -------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def save_sharded(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | None) -> None:
    """transformers 4.40's `shard_checkpoint` + `save_pretrained`: keys in state-dict order, a new
    shard when the next tensor would pass `max_shard_size`; `model-0000i-of-0000n.safetensors`
    and `model.safetensors.index.json`; one `model.safetensors` when it fits."""
    shards, size = [{}], 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_size is not None and size + nbytes > max_shard_size and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        _save_safetensors(state, folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save_safetensors(shard, folder / name)
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def build_tokenizer(extra: str = "") -> Tokenizer:
    """One token per character, and llm-jp v1's habit of appending `<EOD|LLM-jp>` to every
    encoding (its `tokenizer.json` post-processor)."""
    chars = SYSTEM + "ユーザーシステム: \n？?、。" + extra
    chars += "".join(chr(c) for c in range(0x3041, 0x3097)) + "".join(chr(c) for c in range(0x30A1, 0x30FB))
    chars += "".join(chr(c) for c in range(0x20, 0x7F))
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, EOD, *dict.fromkeys(chars)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([PAD, UNK, EOD])
    core.post_processor = processors.TemplateProcessing(single=f"$A {EOD}", special_tokens=[(EOD, vocab[EOD])])
    return core


def write_tokenizer(core: Tokenizer, folder: Path, trained: bool) -> None:
    """The three files transformers 4.40's `PreTrainedTokenizerFast.save_pretrained` writes: as
    the LM publishes them, or (`trained`) as `Trainer` saves the tokenizer `train_llava.py`
    loaded with `model_max_length=1532, padding_side="right"` and `pad_token = unk_token`
    (tokens read from the file are written back as AddedToken dicts, the assigned pad as text)."""
    core.save(str(folder / "tokenizer.json"))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added = {str(core.token_to_id(t)): {"content": t} | flags | {"special": True} for t in (PAD, UNK, EOD)}
    config = {"added_tokens_decoder": added, "clean_up_tokenization_spaces": True, "eos_token": EOD,
              "model_max_length": int(1e30), "pad_token": PAD, "tokenizer_class": "PreTrainedTokenizerFast",
              "unk_token": UNK}
    specials = {"eos_token": EOD, "pad_token": PAD, "unk_token": UNK}
    if trained:
        config |= {"model_max_length": 1532, "padding_side": "right", "pad_token": UNK}
        specials = {"eos_token": {"content": EOD} | flags, "pad_token": UNK, "unk_token": {"content": UNK} | flags}
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", specials)


def _predecessor_config(lm_config: dict, vision_tower: str, stage: int) -> dict:
    """`LlavaConfig` (a GPT2Config, model_type llava-jp) after `initialize_vision_modules` and
    `train_llava.py`'s settings, as `to_diff_dict` writes it."""
    config = dict(lm_config) | {
        "model_type": "llava-jp",
        "mm_vision_tower": vision_tower,
        "scales": SCALES,
        "use_mm_proj": True,
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": VISION["hidden_size"] * len(SCALES),
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "square",
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 1532,
        "tune_mm_mlp_adapter": stage == 1,
        "use_cache": True,
    }
    if stage == 2:  # save_pretrained records the class and the first parameter's dtype
        config |= {"architectures": ["LlavaGpt2ForCausalLM"], "torch_dtype": "float32"}
    return config


def write_llava_jp_v1_1(root: str | Path, seed: int = 3, max_shard_size: int | None = -1,
                        vision_tower: str = SIGLIP_ID, lm_name: str = LM_ID) -> PredecessorCheckpoint:
    """Write the tower and LM as published, then stage 1's and stage 2's outputs, under `root`.

    seed: the default gives a greedy answer that varies from token to token and with the image.
    max_shard_size: bytes per shard; -1 (default) splits in two as the full-size release is,
    None writes one `model.safetensors`. vision_tower / lm_name: what the configs record
    (`mm_vision_tower`, `_name_or_path`), the hub ids by default as in the published release.
    """
    root = Path(root)
    paths = PredecessorCheckpoint(root / "siglip", root / "lm", root / "stage1", root / "stage2", root / "probe.png")
    for folder in (paths.siglip, paths.lm, paths.stage1, paths.stage2):
        folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    # google/siglip-so400m-patch14-384: SiglipModel, transformers 4.37's files
    tower = _random(siglip_vision_shapes(), generator, 0.15)
    siglip_state = {f"text_model.{k}": v for k, v in _random(siglip_text_shapes(), generator, 0.1).items()}
    siglip_state |= {f"vision_model.{k}": v for k, v in tower.items()}
    siglip_state |= {"logit_scale": torch.tensor([2.3026]), "logit_bias": torch.tensor([-10.0])}
    _save_safetensors(siglip_state, paths.siglip / "model.safetensors")
    _write_json(paths.siglip / "config.json", {
        "architectures": ["SiglipModel"], "initializer_factor": 1.0, "model_type": "siglip",
        "text_config": TEXT | {"hidden_act": "gelu_pytorch_tanh", "model_type": "siglip_text_model"},
        "torch_dtype": "float32", "transformers_version": "4.37.0.dev0",
        "vision_config": VISION | {"model_type": "siglip_vision_model"}})
    _write_json(paths.siglip / "preprocessor_config.json", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
        "size": {"height": VISION["image_size"], "width": VISION["image_size"]}})

    # llm-jp/llm-jp-1.3b-v1.0: GPT2LMHeadModel, untied head, published in float16
    core = build_tokenizer()
    vocab = core.get_vocab_size()
    lm = {k: v.half() for k, v in _random(gpt2_shapes(vocab), generator, 0.2).items()}
    lm_config = GPT2_FIELDS | LM | {
        "_name_or_path": lm_name, "architectures": ["GPT2LMHeadModel"], "bos_token_id": core.token_to_id(EOD),
        "eos_token_id": core.token_to_id(EOD), "model_type": "gpt2", "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": TRANSFORMERS_VERSION, "vocab_size": vocab}
    _save_safetensors(lm, paths.lm / "model.safetensors")
    _write_json(paths.lm / "config.json", {k: v for k, v in lm_config.items() if k != "_name_or_path"})
    write_tokenizer(core, paths.lm, trained=False)

    # stage 1: the projector alone (named_parameters of LlavaGpt2ForCausalLM)
    mm_hidden = VISION["hidden_size"] * len(SCALES)
    projector = _random(projector_shapes(mm_hidden, LM["n_embd"]), generator, 0.3)
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.items()}, paths.stage1 / "mm_projector.bin")
    _write_json(paths.stage1 / "config.json", _predecessor_config(lm_config, vision_tower, stage=1))

    # stage 2: LM and projector fine-tuned (float32), the frozen tower in bfloat16
    state = {k: v.float() + 0.02 * torch.randn(v.shape, generator=generator) for k, v in lm.items()}
    state |= {f"model.vision_tower.vision_tower.vision_model.{k}": v.bfloat16() for k, v in tower.items()}
    state |= {f"model.mm_projector.{k}": v + 0.02 * torch.randn(v.shape, generator=generator)
              for k, v in projector.items()}
    if max_shard_size == -1:
        max_shard_size = math.ceil(sum(t.numel() * t.element_size() for t in state.values()) * 0.75)
    save_sharded(state, paths.stage2, max_shard_size)
    _write_json(paths.stage2 / "config.json", _predecessor_config(lm_config, vision_tower, stage=2))
    _write_json(paths.stage2 / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": lm_config["bos_token_id"],
        "eos_token_id": lm_config["eos_token_id"], "transformers_version": TRANSFORMERS_VERSION})
    write_tokenizer(core, paths.stage2, trained=True)
    # Trainer._save pickles its TrainingArguments next to the weights: a pickle that is no tensor
    torch.save(argparse.Namespace(output_dir=str(paths.stage2), bf16=True, learning_rate=2e-5),
               paths.stage2 / "training_args.bin")
    probe_image().save(paths.image)
    return paths
