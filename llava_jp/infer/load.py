"""The one loader and the one dtype policy: every command loads and saves models through here.

Why one place: transformers 5 loads `from_pretrained` with `dtype="auto"` (the dtype the config
names), so an LM published in bfloat16 / float16 (llm-jp-3 / llm-jp v1) or a model saved while
its first module was bf16 would silently come back in half precision, and small training
updates would be rounded away. Here the caller always names the dtype.

The policy (docs/training.md):
- load: every floating weight in the dtype the caller asks for (training: float32);
- train (`apply_training_dtypes`): trainable parameters are float32 masters whatever dtype they
  were loaded in; frozen parts (the tower; the LM in stage 1) are stored in the compute dtype
  (bfloat16 under `mixed_precision: bf16`, float16 under fp16, float32 otherwise);
- save (`save_model`): one deliberate dtype for every floating weight, recorded as the
  config's `dtype` (training's `save_dtype`, default float32: nothing the run learned is
  rounded; `llava-jp release` keeps the dtype its source records).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llava_jp.core.modeling import LlavaJpForConditionalGeneration
from llava_jp.core.processing import LlavaJpProcessor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SAVE_DTYPE = "float32"


def parse_dtype(name: str | torch.dtype, where: str = "dtype") -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' (or a torch dtype) -> torch dtype; errors name `where`."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"{where}: expected one of {sorted(DTYPES)}, got {name}")
        return name
    if name not in DTYPES:
        raise ValueError(f"{where}: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a GPU that supports it, float32 elsewhere (CPU bf16 matmuls are slow)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def saved_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a saved model's config records (None when it records none or is not local)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    name = json.loads(config.read_text(encoding="utf-8")).get("dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def is_preset(source: str | Path) -> bool:
    """A bundled preset name or a preset YAML file (not a saved model)."""
    from llava_jp.presets.builder import PRESET_DIR

    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        return True
    return not (path / "config.json").exists() and (PRESET_DIR / f"{source}.yaml").exists()


def load_model(
    source: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    pretrained: bool = True,
    quantization_config=None,
) -> tuple[LlavaJpForConditionalGeneration, LlavaJpProcessor]:
    """(model, processor) from a saved llava-jp model (directory or hub id) or a preset.

    dtype: every floating weight ends up in it, whatever the checkpoint or its config says;
        "saved" keeps the dtype a saved model records (what `llava-jp release` wants).
    pretrained: presets only: load the tower and LM from their hub ids / paths (else random).
    quantization_config: saved models only: bitsandbytes 4-bit for QLoRA (`train/lora.py`).
    A LoRA adapter folder (`adapter_config.json`) loads as its base with the adapters merged.
    The model is on `device` (default: left on the CPU) and in train mode as transformers
    returns it; callers that only generate call `.eval()`.
    """
    from llava_jp.train import lora

    if dtype == "saved":
        dtype = saved_dtype(source) or torch.float32
    dtype = parse_dtype(dtype)
    if is_preset(source):
        from llava_jp.presets.builder import build

        model, processor = build(str(source), pretrained=pretrained, dtype=dtype)
    elif lora.is_adapter(source):
        model, processor = lora.merged_from(source, dtype), LlavaJpProcessor.from_pretrained(source)
    else:
        from llava_jp.errors import loading

        with loading(str(source), "--model"):  # a missing folder or unreachable hub id: one line
            model = LlavaJpForConditionalGeneration.from_pretrained(source, dtype=dtype,
                                                                    quantization_config=quantization_config)
            processor = LlavaJpProcessor.from_pretrained(source)
    for p in model.parameters():  # a checkpoint holding mixed dtypes comes back mixed otherwise
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    if device is not None:
        model = model.to(device)
    return model, processor


def apply_training_dtypes(model: torch.nn.Module, mixed_precision: str) -> None:
    """Trainable parameters -> float32 masters; frozen parameters -> the compute dtype.

    Call after `requires_grad` is set for the stage. Only parameters change: floating buffers
    (e.g. rotary frequencies) keep the precision their module chose.
    """
    compute = COMPUTE_DTYPES[mixed_precision]
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        wanted = torch.float32 if p.requires_grad else compute
        if p.dtype != wanted:
            p.data = p.data.to(wanted)


def save_model(model: LlavaJpForConditionalGeneration, processor: LlavaJpProcessor | None, path: str | Path,
               dtype: torch.dtype | str = DEFAULT_SAVE_DTYPE, state_dict: dict | None = None, **kwargs) -> Path:
    """`save_pretrained` with every floating weight in `dtype`, recorded as the config's `dtype`
    (transformers would record the dtype of the model's first parameter: a bf16-stored tower
    made a whole fp32-trained model reload in bf16)."""
    dtype = parse_dtype(dtype)
    path = Path(path)
    state_dict = model.state_dict() if state_dict is None else state_dict
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    model.save_pretrained(path, state_dict=cast, **kwargs)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["dtype"] = dtype_name(dtype)
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict) and "dtype" in config[sub]:
            config[sub]["dtype"] = dtype_name(dtype)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    model.config.dtype = dtype
    if processor is not None:
        processor.save_pretrained(path)
    return path
