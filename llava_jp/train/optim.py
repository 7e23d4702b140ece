"""What trains in each stage (freezing, frozen-part storage dtype, activation checkpointing)
and the optimizer that trains it."""

from __future__ import annotations

import torch

from llava_jp.core.modeling import LlavaJpForConditionalGeneration
from llava_jp.infer.load import apply_training_dtypes
from llava_jp.train.config import TrainConfig


def enable_activation_checkpointing(lm) -> None:
    """Non-reentrant activation checkpointing; the method's name changed in transformers 5
    (`gradient_checkpointing_enable` is the deprecated alias)."""
    enable = getattr(lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_for_training(model: LlavaJpForConditionalGeneration, cfg: TrainConfig) -> None:
    """Set what trains for the stage, apply the dtype policy (trainable parameters in float32,
    frozen ones in the compute dtype: `apply_training_dtypes`), enable gradient checkpointing."""
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    if cfg.stage == 2 and not cfg.lora:  # with LoRA, PEFT adds the LM's trainable adapters (train/lora.py)
        model.language_model.requires_grad_(True)
    if cfg.train_vision_tower:
        model.vision_tower.requires_grad_(True)
        model.freeze_unused_vision_parameters()
    apply_training_dtypes(model, cfg.mixed_precision)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model.language_model)
        model.language_model.config.use_cache = False


def build_optimizer(model: LlavaJpForConditionalGeneration, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or 8-bit AdamW; the projector may have its own learning rate; no weight decay on
    biases and norms. With 8-bit AdamW, embedding tables keep 32-bit optimizer state."""
    projector_ids = {id(p) for p in model.multi_modal_projector.parameters()}
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = cfg.projector_lr if (id(p) in projector_ids and cfg.projector_lr) else cfg.learning_rate
        decay = 0.0 if (p.ndim < 2 or "norm" in name or "ln_" in name) else cfg.weight_decay
        groups.setdefault((lr, decay), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.learning_rate)
    import bitsandbytes as bnb
    from bitsandbytes.optim import GlobalOptimManager

    manager = GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.weight.requires_grad:
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    return bnb.optim.AdamW8bit(param_groups, lr=cfg.learning_rate)
