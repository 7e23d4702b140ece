"""Training configuration: a dataclass, loaded from YAML, overridable from the command line.

The command line is transformers' `HfArgumentParser` over `TrainConfig`, so `llava-jp train
--help` lists every key with its type, default and help, and LLaVA's `TrainingArguments` names
work as aliases. A YAML file (`--config`) sets the defaults the flags then override.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import get_type_hints

from transformers.hf_argparser import HfArg, HfArgumentParser, string_to_bool

from llava_jp.errors import UserError, closest, read_yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class TrainConfig:
    """Everything one training stage needs. Field names are the YAML keys and `--key` flags;
    `aliases` are the names LLaVA / transformers' TrainingArguments users type."""

    # what to start from
    model: str | None = HfArg(default=None, help="a saved llava-jp model: folder or hub id (or set `preset`)")
    preset: str | None = HfArg(default=None, help="bundled preset name or preset YAML (or set `model`)")
    pretrained_projector: str | None = HfArg(
        default=None, aliases=["--pretrain_mm_mlp_adapter"], help="stage 2: stage 1's projector.safetensors")
    stage: int = HfArg(default=2, help="1: train the projector only; 2: projector + LM")
    train_vision_tower: bool = HfArg(default=False, help="also train the vision tower (frozen in the reference recipe)")
    template: str | None = HfArg(default=None, aliases=["--version"],
                                 help="prompt template, overriding the model's (plain for stage 1, llm-jp-v1)")

    # data
    data_path: str = HfArg(default="", help="training data: LLaVA JSON list / JSONL file, datasets folder or hub id")
    image_folder: str = HfArg(default="", help="folder the samples' image paths are relative to")
    max_length: int = HfArg(default=1532, aliases=["--model_max_length"], help="tokens per sample, image tokens included")
    group_by_modality_length: bool = HfArg(default=True, help="batch image and text-only samples apart, by token length")
    strict_data: bool = HfArg(default=False, help="stop at the first bad sample instead of skipping it")
    feature_cache: str | None = HfArg(
        default=None, help="`llava-jp cache-features --out` folder: frozen-tower features instead of pixels")
    # none on CPU by default: the loader would take the cores the step computes on (docs/benchmarks.md)
    dataloader_num_workers: int | None = HfArg(
        default=None, help="loader worker processes; unset: one per CPU core up to 8 per GPU process on CUDA, 0 on CPU")
    dataloader_pin_memory: bool = HfArg(default=True, help="page-locked batches, copied to the GPU asynchronously (CUDA only)")
    dataloader_persistent_workers: bool = HfArg(default=True, help="workers live across epochs (no restart per epoch)")
    dataloader_prefetch_factor: int = HfArg(default=4, help="batches each worker prepares ahead")

    # optimisation
    output_dir: str = HfArg(default="outputs/run", help="checkpoints, log.jsonl and the result")
    num_epochs: float = HfArg(default=1.0, aliases=["--num_train_epochs"], help="passes over the data (fractions allowed)")
    max_steps: int | None = HfArg(default=None, help="optimizer steps; overrides num_epochs")
    per_device_batch_size: int = HfArg(default=8, aliases=["--per_device_train_batch_size"],
                                       help="samples per micro-batch on each process")
    gradient_accumulation_steps: int = HfArg(default=1, help="micro-batches per optimizer step")
    learning_rate: float = HfArg(default=2e-5, help="peak learning rate")
    projector_lr: float | None = HfArg(default=None, aliases=["--mm_projector_lr"],
                                       help="the projector's own peak learning rate (default: learning_rate)")
    weight_decay: float = HfArg(default=0.0, help="AdamW weight decay (never on biases and norms)")
    warmup_ratio: float = HfArg(default=0.03, help="share of the steps spent warming up, in [0, 1)")
    lr_scheduler: str = HfArg(default="cosine", aliases=["--lr_scheduler_type"],
                              help="transformers scheduler name: cosine, linear, constant_with_warmup, ...")
    max_grad_norm: float = HfArg(default=1.0, help="gradient clipping (0: off)")
    optimizer: str = HfArg(default="adamw", help="adamw, or adamw_8bit (bitsandbytes; embeddings keep 32-bit state)")
    mixed_precision: str = HfArg(default="no", help="no, bf16 (autocast over fp32 master weights) or fp16")
    gradient_checkpointing: bool = HfArg(default=False, help="recompute LM activations in backward (less memory)")
    seed: int = HfArg(default=42, help="seeds data order, initialisation and dropout")
    save_dtype: str = HfArg(default="float32",
                            help="float32, bfloat16 or float16: every weight of the final output, recorded in its config")

    # LoRA / QLoRA (stage 2; train/lora.py)
    lora: bool = HfArg(default=False, aliases=["--lora_enable"],
                       help="stage 2 with LoRA adapters on the LM (PEFT); the projector still trains in full")
    lora_r: int = HfArg(default=64, help="LoRA rank")
    lora_alpha: int = HfArg(default=16, help="LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)")
    lora_dropout: float = HfArg(default=0.05, help="dropout on the LoRA input")
    lora_target_modules: list[str] = HfArg(
        default_factory=lambda: ["all-linear"],
        help="LM layers to adapt, by name (c_attn c_proj c_fc, q_proj v_proj, ...); all-linear: every linear but the head")
    lora_merge: bool = HfArg(default=False, help="also write the merged model (model/) next to the adapter folder")
    bits: int = HfArg(default=16, help="4: the frozen LM base in 4-bit NF4 through bitsandbytes (QLoRA); 16: as saved")

    # bookkeeping
    logging_steps: int = HfArg(default=10, help="steps between log.jsonl records")
    save_steps: int = HfArg(default=500, help="steps between checkpoints")
    save_total_limit: int = HfArg(default=2, help="checkpoints kept")
    report_to: list[str] = HfArg(default_factory=list, help="accelerate trackers: tensorboard, wandb, ... (none: off)")
    time_budget_s: float | None = HfArg(default=None, help="stop (and save) once this much wall time has passed")
    overwrite_output_dir: bool = HfArg(
        default=False, help="a fresh run over an earlier run's checkpoints deletes them (otherwise refused)")

    def validate(self) -> None:
        """Check the fields once, with errors that name the field."""
        from llava_jp.core.templates import TEMPLATES

        if (self.model is None) == (self.preset is None):
            raise UserError("set exactly one of `model` (a saved llava-jp model) or `preset`")
        if self.stage not in (1, 2):
            raise UserError(f"stage: expected 1 or 2, got {self.stage!r}")
        if not self.data_path:
            raise UserError("data_path: required")
        if self.template is not None and self.template not in TEMPLATES:
            raise UserError(f"template {self.template!r}: unknown; known: {sorted(TEMPLATES)}"
                            + closest(self.template, TEMPLATES))
        if self.optimizer not in ("adamw", "adamw_8bit"):
            raise UserError(f"optimizer: expected 'adamw' or 'adamw_8bit', got {self.optimizer!r}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"save_dtype: expected 'float32', 'bfloat16' or 'float16', got {self.save_dtype!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise UserError(f"mixed_precision: expected 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps", "save_steps",
                     "dataloader_prefetch_factor"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise UserError(f"dataloader_num_workers: must be >= 0, got {self.dataloader_num_workers}")
        if self.feature_cache and self.train_vision_tower:
            raise UserError("feature_cache: cached features need a frozen vision tower (train_vision_tower is true)")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.bits not in (4, 16):
            raise UserError(f"bits: expected 4 (QLoRA) or 16, got {self.bits}")
        if self.lora or self.bits == 4:
            if not self.lora:
                raise UserError("bits 4: quantizes the frozen base for LoRA; set lora true (QLoRA)")
            if self.stage != 2:
                raise UserError("lora: adapters are for stage 2 (stage 1 trains only the projector)")
            if self.train_vision_tower:
                raise UserError("lora: the vision tower stays frozen with LoRA; set train_vision_tower false")
            if self.model is None:
                raise UserError("lora: start from a saved model (`model`); `llava-jp init --preset NAME --out DIR` "
                                "writes one, and the adapter folder names it as its base")
        self.report_to = [t for t in self.report_to if t not in ("none", "")]


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = get_type_hints(TrainConfig)


class _SetTo(argparse.Action):
    """A TrainingArguments switch that sets one of our keys: `--bf16` / `--bf16 true` ->
    mixed_precision bf16 (`--bf16 false` leaves it)."""

    def __init__(self, option_strings, dest, key, value, **kwargs):
        self.key, self.value = key, value
        super().__init__(option_strings, dest, nargs="?", const=True, type=string_to_bool,
                         default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, given, option_string=None):
        if given:
            setattr(namespace, self.key, self.value)


class _Refuse(argparse.Action):
    """A TrainingArguments flag we do not take, with what to do instead."""

    def __init__(self, option_strings, dest, message, **kwargs):
        self.message = message
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, given, option_string=None):
        raise UserError(f"{option_string}: {self.message}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each key's help ends with its type and default."""

    def _get_help_string(self, action):
        if action.default is argparse.SUPPRESS or not action.option_strings or action.dest in ("help", "resume", "allow_resume_changes"):
            return action.help
        kind = "bool" if action.type is string_to_bool else getattr(action.type, "__name__", "str")
        if action.nargs == "+":
            kind = f"list of {kind}"
        return f"{action.help} [{kind}, default: %(default)s]"


class _Parser(HfArgumentParser):
    """Parse errors are user mistakes: one line, naming the flag (cli.py prints it, exit 2)."""

    def error(self, message):
        raise UserError(message)


DEEPSPEED_MESSAGE = ("DeepSpeed is configured through accelerate, not a training flag: "
                     "`accelerate launch --config_file scripts/accelerate/<zero2|zero3>.yaml -m llava_jp.cli train ...` "
                     "(see docs/training.md)")


def build_parser(prog: str = "llava-jp train") -> HfArgumentParser:
    """`llava-jp train`'s parser: --config, --resume, every TrainConfig key, LLaVA's switches."""
    parser = _Parser(TrainConfig, prog=prog, allow_abbrev=False, formatter_class=_HelpFormatter,
                     description="Train one stage. Keys come from --config (YAML), then from --key value flags.",
                     epilog="Aliases are the names LLaVA / TrainingArguments use. Example: llava-jp train "
                            "--config stage2 --learning_rate 1e-4 --output_dir runs/x")
    parser.add_argument("--config", help="YAML file or bundled config name "
                                         f"({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))})")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--allow_resume_changes", action="store_true",
                        help="with --resume: continue even if world size, per-device batch, accumulation or total "
                             "steps differ from the checkpoint's")
    llava = parser.add_argument_group("LLaVA / TrainingArguments switches")
    llava.add_argument("--bf16", action=_SetTo, key="mixed_precision", value="bf16", help="= --mixed_precision bf16")
    llava.add_argument("--fp16", action=_SetTo, key="mixed_precision", value="fp16", help="= --mixed_precision fp16")
    llava.add_argument("--deepspeed", action=_Refuse, message=DEEPSPEED_MESSAGE, help="refused: " + DEEPSPEED_MESSAGE)
    return parser


def _typed(name: str, value, where: str):
    """A YAML value checked against the key's type (`1e-4` is a string to YAML 1.1: converted)."""
    hint = _TYPES[name]
    kind = next((t for t in getattr(hint, "__args__", (hint,)) if t is not type(None)), hint)
    if value is None or kind not in (int, float, bool) or type(value) is kind or (kind is float and type(value) is int):
        return value
    if kind is not bool and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise UserError(f"{where}: {name}: expected {kind.__name__}, got {value!r}")


def resolve_config_path(name_or_path: str) -> Path:
    """A bundled config by name (`stage1`, `stage2`, ...) or a YAML file path."""
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = CONFIG_DIR / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"--config {name_or_path!r}: neither a file nor a bundled config ({', '.join(known)})"
                    + closest(name_or_path, known))


def _yaml_values(path: str) -> dict:
    file = resolve_config_path(path)
    data = read_yaml(file, "--config") or {}
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a mapping of config keys, got {type(data).__name__}")
    for key in data:
        if key not in _FIELDS:
            raise UserError(f"{file}: unknown key {key!r}" + closest(str(key), _FIELDS))
    return {k: _typed(k, v, str(file)) for k, v in data.items()}


def parse_args(argv: list[str], **values) -> tuple[TrainConfig, argparse.Namespace]:
    """`llava-jp train` arguments -> (validated config, launch options: `resume`,
    `allow_resume_changes`). `values` (Python callers) override both the YAML and the flags."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        parser.set_defaults(**_yaml_values(known.config))
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        raise UserError(_unknown_argument(rest, parser))
    for key in values:
        if key not in _FIELDS:
            raise UserError(f"unknown config key {key!r}" + closest(key, _FIELDS))
    config = TrainConfig(**{**{k: v for k, v in vars(namespace).items() if k in _FIELDS}, **values})
    config.validate()
    launch = argparse.Namespace(resume=namespace.resume, allow_resume_changes=namespace.allow_resume_changes)
    return config, launch


def _unknown_argument(rest: list[str], parser: argparse.ArgumentParser) -> str:
    flag = next((a for a in rest if a.startswith("-")), None)
    if flag is None:
        return f"unexpected value {rest[0]!r} (keys are given as --key value)"
    name = flag.split("=", 1)[0]
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    return f"unknown option {name}" + closest(name, options)


def load_config(path: str | None = None, overrides: list[str] | None = None, **values) -> TrainConfig:
    """YAML file, then `--key value` overrides, then keyword values; validated once."""
    return parse_args((["--config", path] if path else []) + list(overrides or []), **values)[0]
