"""Training configuration: a dataclass, loaded from YAML, overridable from the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class TrainConfig:
    """Everything one training stage needs. Field names are the YAML keys and `--key` flags."""

    # what to start from: a saved llava-jp model (dir or hub id) or a preset name / YAML file
    model: str | None = None
    preset: str | None = None
    pretrained_projector: str | None = None  # stage 2: the stage-1 projector.safetensors
    stage: int = 2  # 1: projector only; 2: projector + LM
    train_vision_tower: bool = False
    template: str | None = None  # overrides the processor's template ("plain" for stage 1)

    # data
    data_path: str = ""
    image_folder: str = ""
    max_length: int = 1532
    group_by_modality_length: bool = True
    strict_data: bool = False
    feature_cache: str | None = None  # `llava-jp cache-features --out` dir: frozen-tower features instead of pixels
    # loader worker processes; None: one per CPU core up to 8 per GPU process on CUDA, 0 on CPU
    # (the loader would take the cores the step computes on); docs/benchmarks.md sizes them
    dataloader_num_workers: int | None = None
    dataloader_pin_memory: bool = True  # page-locked batches, copied to the GPU asynchronously (CUDA only)
    dataloader_persistent_workers: bool = True  # workers live across epochs (no restart per epoch)
    dataloader_prefetch_factor: int = 4  # batches each worker prepares ahead

    # optimisation
    output_dir: str = "outputs/run"
    num_epochs: float = 1.0
    max_steps: int | None = None
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"  # or "adamw_8bit" (bitsandbytes; embeddings keep 32-bit state)
    mixed_precision: str = "no"  # "bf16": autocast over fp32 master weights
    gradient_checkpointing: bool = False
    seed: int = 42
    save_dtype: str = "float32"  # every weight of the final output, recorded in its config (llava_jp/infer/load.py)

    # bookkeeping
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb
    time_budget_s: float | None = None  # stop (and save) once this much wall time has passed
    overwrite_output_dir: bool = False  # a fresh run over an earlier run's checkpoints deletes them

    def validate(self) -> None:
        """Check the fields once, with errors that name the field."""
        if (self.model is None) == (self.preset is None):
            raise ValueError("set exactly one of `model` (a saved llava-jp model) or `preset`")
        if self.stage not in (1, 2):
            raise ValueError(f"stage: expected 1 or 2, got {self.stage!r}")
        if not self.data_path:
            raise ValueError("data_path: required")
        if self.optimizer not in ("adamw", "adamw_8bit"):
            raise ValueError(f"optimizer: expected 'adamw' or 'adamw_8bit', got {self.optimizer!r}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"save_dtype: expected 'float32', 'bfloat16' or 'float16', got {self.save_dtype!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision: expected 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps", "save_steps",
                     "dataloader_prefetch_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers: must be >= 0, got {self.dataloader_num_workers}")
        if self.feature_cache and self.train_vision_tower:
            raise ValueError("feature_cache: cached features need a frozen vision tower (train_vision_tower is true)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, text: str):
    """Parse a command-line value with YAML rules (booleans, null, lists), keeping strings as typed."""
    value = yaml.safe_load(text)
    if _FIELDS[name].type in ("str", "str | None") and value is not None:
        return str(text)
    return value


def _typed(name: str, value):
    """Numbers written as `1e-4` are strings to YAML 1.1: convert by the field's type, or name it."""
    kind = _FIELDS[name].type.split(" | ")[0]
    if value is None or kind not in ("int", "float") or isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    try:
        return int(value) if kind == "int" else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind}, got {value!r}") from None


def resolve_config_path(name_or_path: str) -> Path:
    """A bundled config by name (`stage1`, `stage2`, ...) or a YAML file path."""
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a bundled config ({known})")


def load_config(path: str | None = None, overrides: list[str] | None = None, **values) -> TrainConfig:
    """YAML file, then `--key value` overrides, then keyword values; validated once."""
    data: dict = {}
    if path:
        with open(resolve_config_path(path), encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    overrides = list(overrides or [])
    while overrides:
        flag = overrides.pop(0)
        if not flag.startswith("--"):
            raise ValueError(f"expected --key value, got {flag!r}")
        key, _, inline = flag[2:].partition("=")
        key = key.replace("-", "_")
        if key not in _FIELDS:
            raise ValueError(f"unknown config key {key!r}")
        if inline:
            text = inline
        elif overrides and not overrides[0].startswith("--"):
            text = overrides.pop(0)
        else:
            text = "true"
        data[key] = _coerce(key, text)
    data.update(values)
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{path or 'config'}: unknown key(s) {unknown}")
    config = TrainConfig(**{k: _typed(k, v) for k, v in data.items()})
    config.validate()
    return config
