"""LoRA and QLoRA for stage 2, through PEFT: adapters on the LM's linear layers, the projector
trained in full next to them (PEFT's `modules_to_save`, so it travels inside the adapter
folder: LLaVA-style LoRA checkpoints that lose the projector are the classic failure), and
for QLoRA the frozen LM base loaded in 4-bit NF4 by bitsandbytes.

The final output is the adapter folder (adapters + projector + processor; its
`base_model_name_or_path` names the model training started from) or, with `lora_merge`, a
merged model: the base reloaded in full precision with the adapters folded in, the form that
loads without PEFT. `llava_jp.infer.load.load_model` opens either.
"""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER_SUBDIR = "adapter"  # stage 2's output with LoRA (without lora_merge)
ADAPTER_CONFIG = "adapter_config.json"
PROJECTOR = "multi_modal_projector"
# AttentionOutputProjection: GPT-2's attn.c_proj as our model holds it, a Conv1D (core/vllm_compat.py)
_LINEAR_CLASSES = ("Linear", "Conv1D", "AttentionOutputProjection", "Linear4bit")


def quantization_config(cfg):
    """bitsandbytes 4-bit NF4 for the LM's frozen linear layers (tower, projector, head stay as they are)."""
    if cfg.bits != 4:
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute,
                              llm_int8_skip_modules=["vision_tower", PROJECTOR, "lm_head"])


def target_modules(model, wanted: list[str]) -> list[str]:
    """Full names of the LM's linear layers to adapt: all of them but the output head
    (`all-linear`), or those whose own name is in `wanted` (c_attn, q_proj, ...)."""
    head = model.language_model.get_output_embeddings()
    names = [f"language_model.{n}" for n, m in model.language_model.named_modules()
             if type(m).__name__ in _LINEAR_CLASSES and m is not head]
    if wanted != ["all-linear"]:
        names = [n for n in names if n.rsplit(".", 1)[-1] in wanted]
    if not names:
        from llava_jp.errors import UserError

        raise UserError(f"lora_target_modules {wanted}: matches no linear layer of the LM")
    return names


def add_adapters(model, cfg):
    """The model wrapped by PEFT: LoRA on the LM, projector fully trained, everything else frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=target_modules(model, cfg.lora_target_modules), modules_to_save=[PROJECTOR])
    base_name = cfg.model if not Path(cfg.model).exists() else str(Path(cfg.model).resolve())
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def save_adapter(peft_model, processor, path: Path, state_dict: dict | None = None) -> None:
    """Adapter folder: adapter_config.json + adapter_model.safetensors (LoRA + projector) + processor."""
    peft_model.save_pretrained(path, state_dict=state_dict)
    processor.save_pretrained(path)


def merged_from(adapter_dir: str | Path, dtype: torch.dtype | None = None):
    """The adapter folder's base, loaded in full precision, with the adapters folded in."""
    from peft import PeftConfig, PeftModel

    from llava_jp import LlavaJpForConditionalGeneration

    base_name = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    base = LlavaJpForConditionalGeneration.from_pretrained(base_name, dtype=dtype or torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()
