"""What differs between the multi-process strategies (DDP, FSDP, DeepSpeed ZeRO-2/3).

The strategy comes from `accelerate launch --config_file scripts/accelerate/*.yaml`; the loop
and the checkpoints are the same code for all of them. What differs is collected here:
the DeepSpeed config values our training config owns, who writes the model's state, and the
arguments accelerate's `save_state` / `load_state` pass to the engine.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType


def name(accelerator: Accelerator) -> str:
    """`ddp`, `fsdp`, `zero2`, `zero3` or `single` (recorded in checkpoints)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure(accelerator: Accelerator, cfg) -> None:
    """Make the engine use the training config's accumulation, clipping and micro-batch.

    DeepSpeed steps its optimizer inside `backward` at its own accumulation boundary and clips
    by its own config; an accelerate config with other values would silently train another
    recipe (e.g. one optimizer update per micro-batch), so a conflicting value is an error and
    a missing or `auto` one is filled in from the training config.
    """
    accum = cfg.gradient_accumulation_steps
    if is_deepspeed(accelerator):
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ours = {"gradient_accumulation_steps": accum, "gradient_clipping": float(cfg.max_grad_norm or 0.0),
                "train_micro_batch_size_per_gpu": cfg.per_device_batch_size}
        for key, value in ours.items():
            theirs = ds_config.get(key)
            if theirs not in (None, "auto") and float(theirs) != float(value):
                raise ValueError(f"the DeepSpeed config sets {key}={theirs} but the training config's value is {value}: "
                                 f"remove {key} from the accelerate/DeepSpeed config (the trainer sets it)")
            ds_config[key] = value
    accelerator.gradient_accumulation_steps = accum  # also overrides ACCELERATE_GRADIENT_ACCUMULATION_STEPS


def refuse_unsupported(accelerator: Accelerator, cfg, text_only_samples: bool) -> None:
    """ZeRO-3 keeps the previous step's gradient for a weight that a step's first micro-batch
    does not use. The projector is always used (see `embed_inputs`); a trainable vision tower
    is not, on text-only micro-batches, so that combination would train on stale gradients."""
    if (name(accelerator) == "zero3" and cfg.train_vision_tower and text_only_samples
            and cfg.gradient_accumulation_steps > 1):
        raise ValueError("train_vision_tower with text-only samples and gradient_accumulation_steps > 1 is not supported "
                         "under DeepSpeed ZeRO-3 (stale gradients for the tower): use ZeRO-2 or FSDP, "
                         "--gradient_accumulation_steps 1, or data with an image in every sample")


def save_state_kwargs(accelerator: Accelerator) -> dict:
    """DeepSpeed: leave the frozen parameters out of the checkpoint (the base model has them)."""
    return {"exclude_frozen_parameters": True} if is_deepspeed(accelerator) else {}


def load_state_kwargs(accelerator: Accelerator) -> dict:
    """DeepSpeed: the checkpoint holds only what trains, so the module load is not strict."""
    return {"load_module_strict": False} if is_deepspeed(accelerator) else {}


def saves_model_itself(accelerator: Accelerator) -> bool:
    """FSDP and DeepSpeed write (sharded) model state inside `save_state`; DDP and one process
    leave it to us, and we write only the trainable weights."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
