"""The training loop on `accelerate` (DDP / FSDP / DeepSpeed come from `accelerate launch`).

One optimizer step = `gradient_accumulation_steps` micro-batches on every process, accumulated
through `accelerator.accumulate` (the only way DeepSpeed, which steps inside `backward`, agrees
on where a step ends). The loss is normalised by the number of supervised tokens in the whole
global batch, so one process and N processes compute the same loss and gradients for the same
global batch. Checkpoints go through `accelerator.save_state` (train/checkpoint.py), so every
strategy can save periodically, resume and stop at a time budget.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
import json
import logging
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from llava_jp import LlavaJpForConditionalGeneration, LlavaJpProcessor
from llava_jp.train import features as feature_cache
from llava_jp.infer.load import load_model
from llava_jp.presets.builder import load_preset
from llava_jp.core.modeling import IGNORE_INDEX
from llava_jp.core.processing import IMAGE_FAULTS
from llava_jp.errors import UserError, closest, existing_dir, existing_file, loading
from llava_jp.train import curves, lora
from llava_jp.train import checkpoint as ckpt
from llava_jp.train import strategy
from llava_jp.files import write_json
from llava_jp.train.checkpoint import save_result
from llava_jp.train.config import TrainConfig, parse_args
from llava_jp.train.data import Collator, DataError, encode_dataset, grouped_batches, load_records, make_loader
from llava_jp.train.optim import build_optimizer, prepare_for_training

logger = logging.getLogger(__name__)


# -- model ---------------------------------------------------------------------------------
def setup_model(cfg: TrainConfig) -> tuple[LlavaJpForConditionalGeneration, LlavaJpProcessor]:
    """Load or build the model, load a stage-1 projector, and set what trains (with LoRA: the
    model wrapped by PEFT)."""
    if cfg.preset:
        load_preset(cfg.preset)  # an unknown name is a one-line error here, not a hub lookup
    with loading(cfg.model, "model") if cfg.model else nullcontext():
        model, processor = load_model(cfg.model or cfg.preset, dtype=torch.float32,
                                      quantization_config=lora.quantization_config(cfg))
    if cfg.template:
        processor.template = cfg.template
    if cfg.pretrained_projector:
        weights = load_file(existing_file(cfg.pretrained_projector, "pretrained_projector"))
        model.multi_modal_projector.load_state_dict(weights, strict=True)
    prepare_for_training(model, cfg)
    if cfg.lora:
        model = lora.add_adapters(model, cfg)
    return model, processor


def check_trackers(names: list[str]) -> None:
    """Every `report_to` tracker is known to accelerate and its package is installed; checked
    before anything loads, so a run never finishes without the logging that was asked for."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise UserError(f"report_to {name!r}: not a tracker accelerate knows ({', '.join(known)})"
                            + closest(name, known))
        if name not in available:
            raise UserError(f"report_to {name!r}: its package is not installed (pip install {name}), "
                            "or drop it from report_to; log.jsonl, trainer_state.json and curves.png are written anyway")


# -- loop ----------------------------------------------------------------------------------
def _schedule(lengths, has_image, cfg: TrainConfig, global_batch: int, world: int) -> tuple[list[list[int]], int]:
    """Global batches for the whole run, and the number of optimizer steps."""
    per_epoch = len(grouped_batches(lengths, has_image, global_batch, cfg.seed, cfg.group_by_modality_length))
    if per_epoch == 0:
        raise ValueError("no trainable samples left (see the data report)")
    wanted = cfg.max_steps * cfg.gradient_accumulation_steps if cfg.max_steps else math.ceil(cfg.num_epochs * per_epoch)
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < wanted:
        epoch_batches = grouped_batches(lengths, has_image, global_batch, cfg.seed + epoch, cfg.group_by_modality_length)
        batches += [b for b in epoch_batches if len(b) >= world]
        epoch += 1
    batches = batches[:wanted]
    return batches, len(batches) // cfg.gradient_accumulation_steps


def _supervised_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class _Tally:
    """What happened to samples while training, summed over processes and carried across
    resumes in the checkpoints: samples trained on, image faults by reason, and optimizer
    updates skipped because a whole global batch had no supervised token."""

    KEYS = ("trained_samples", "updates_skipped", *IMAGE_FAULTS)

    def __init__(self, accelerator: Accelerator, saved: dict | None = None):
        self.accelerator = accelerator
        self.saved = torch.tensor([int((saved or {}).get(k, 0)) for k in self.KEYS])
        self.local = torch.zeros(len(self.KEYS), dtype=torch.long)

    def add(self, key: str, n: int = 1) -> None:
        self.local[self.KEYS.index(key)] += n

    def totals(self) -> dict[str, int]:
        """Counts over all processes so far (a collective: every process must call it)."""
        summed = self.accelerator.reduce(self.local.to(self.accelerator.device), "sum").cpu() + self.saved
        return dict(zip(self.KEYS, summed.tolist()))


def _prepare_output_dir(out: Path, resume: bool, overwrite: bool, accelerator: Accelerator) -> None:
    """Clear leftovers of killed saves; refuse a fresh run over an earlier run's checkpoints
    (a later --resume would continue the wrong run) unless `overwrite_output_dir`."""
    earlier = ckpt.complete_checkpoints(out)
    if earlier and not resume and not overwrite:
        raise ckpt.CheckpointError(
            f"{out} holds checkpoints of an earlier run ({earlier[-1].name}): pass --resume to continue it, "
            "--overwrite_output_dir true to start over (deletes them), or use another --output_dir")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if earlier and not resume:
            for path in earlier:
                shutil.rmtree(path)
            (out / "log.jsonl").unlink(missing_ok=True)
        removed = ckpt.remove_stale(out)
        if removed:
            logger.warning("removed leftovers of an interrupted save: %s", ", ".join(removed))
    accelerator.wait_for_everyone()


class ResumeMismatch(ckpt.CheckpointError):
    """--resume with a run that differs from the checkpoint's in what decides the schedule."""


def _check_same_run(path: Path, run: dict, accept_changes: bool, accelerator: Accelerator) -> None:
    """Refuse to resume a checkpoint made with another world size, per-device batch,
    accumulation or step count: the data order, the loss normalisation and the LR schedule
    would silently differ from the run that was interrupted. `--allow_resume_changes` accepts
    it (a sharded engine state cannot change world size or strategy, so that stays refused)."""
    saved = ckpt.read_state(path).get("run")
    if saved is None:
        raise ResumeMismatch(f"{path} was written by an older llava-jp (no run settings recorded): start a new "
                             "--output_dir or delete its checkpoints")
    changed = [f"{key} {saved.get(key)} -> {value}" for key, value in run.items() if saved.get(key) != value]
    if not changed:
        return
    message = f"--resume: this run differs from {path}: {', '.join(changed)}"
    sharded = saved.get("strategy") != "single" or run["strategy"] != "single"
    if accept_changes and not (sharded and (saved.get("strategy") != run["strategy"] or saved.get("world_size") != run["world_size"])):
        logger.warning("%s (accepted by --allow_resume_changes)", message)
        return
    raise ResumeMismatch(message + ("" if accept_changes else "; pass --allow_resume_changes to continue anyway")
                         + (" (a checkpoint's optimizer state cannot change strategy or world size)" if accept_changes else ""))


def _resume(out: Path, model, scheduler, accelerator: Accelerator, run: dict, accept_changes: bool = False) -> dict | None:
    """Load the newest complete checkpoint that loads on every process; a damaged one is
    skipped with a warning. None when there is no checkpoint; an error when there are some
    but none loads, or when the run's settings differ from the checkpoint's."""
    found = ckpt.complete_checkpoints(out)
    errors = []
    for path in reversed(found):
        _check_same_run(path, run, accept_changes, accelerator)
        reason = None
        try:
            state = ckpt.load_checkpoint(path, accelerator, model, scheduler)
        except Exception as err:  # noqa: BLE001 -- damaged files raise whatever their reader raises
            reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        if ckpt._agree(accelerator, reason is None):
            accelerator.print(f"resumed from {path} at step {state['step']}")
            return state
        reason = reason or "another process could not load its part"
        errors.append(f"{path.name}: {reason}")
        logger.warning("could not load %s (%s); trying the one before", path, reason)
    if found:
        raise ckpt.CheckpointError(f"--resume: no checkpoint in {out} could be loaded: {'; '.join(errors)}")
    accelerator.print(f"--resume: no complete checkpoint in {out}, starting fresh")
    return None


def train(cfg: TrainConfig, resume: bool = False, allow_resume_changes: bool = False) -> dict:
    """Run one training stage; returns a summary (also written to output_dir/summary.json)."""
    out = Path(cfg.output_dir)
    check_trackers(cfg.report_to)
    if cfg.image_folder:
        existing_dir(cfg.image_folder, "image_folder")
    set_seed(cfg.seed)  # what setup draws (LoRA's initial adapters, a preset's random parts) is the seed's
    model, processor = setup_model(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with_text_only = True  # a text-only batch leaves the projector without gradient
    accum = cfg.gradient_accumulation_steps
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=accum,
        log_with=cfg.report_to or None,
        project_dir=str(out),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=with_text_only)],
    )
    strategy.configure(accelerator, cfg)
    _prepare_output_dir(out, resume, cfg.overwrite_output_dir, accelerator)
    set_seed(cfg.seed)
    with accelerator.main_process_first():
        dataset, report = encode_dataset(*load_records(cfg.data_path), processor, cfg.max_length, cfg.strict_data)
    lengths = dataset["length"]
    has_image = [bool(x) for x in dataset["image"]]
    world, rank = accelerator.num_processes, accelerator.process_index
    strategy.refuse_unsupported(accelerator, cfg, text_only_samples=not all(has_image))
    batches, total_steps = _schedule(lengths, has_image, cfg, cfg.per_device_batch_size * world, world)
    run = {"strategy": strategy.name(accelerator), "world_size": world, "per_device_batch_size": cfg.per_device_batch_size,
           "gradient_accumulation_steps": accum, "total_steps": total_steps}
    cache = None
    if cfg.feature_cache:  # checked once here: every image cached for this exact vision tower
        cache = feature_cache.open_for_training(cfg.feature_cache, model, processor,
                                                [x for x in dataset["image"] if x], cfg.image_folder)

    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer,
                              num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    unwrapped = accelerator.unwrap_model(model)

    state = _resume(out, unwrapped, scheduler, accelerator, run, allow_resume_changes) if resume else None
    start_step = state["step"] if state else 0
    # accelerate's micro-batch counter decides where an accumulation ends; load_state restores the
    # saved one, which an accepted change of accumulation would leave off our step boundary
    accelerator.step = start_step * accum
    tally = _Tally(accelerator, state.get("data") if state else None)
    if cfg.report_to:
        accelerator.init_trackers("llava-jp", config={k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))})

    my_batches = [b[rank::world] for b in batches[start_step * accum: total_steps * accum]]
    collator = Collator(dataset, processor, cfg.image_folder, strict=cfg.strict_data, feature_cache=cache)
    loader = make_loader(my_batches, collator, cfg, cfg.seed)
    batch_iter = iter(loader)
    log_path = out / "log.jsonl"
    progress = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_main_process,
                    desc=f"stage {cfg.stage}", dynamic_ncols=True)
    model.train()
    started = time.perf_counter()
    window = {"samples": 0, "tokens": 0, "data_s": 0.0, "compute_s": 0.0, "t0": time.perf_counter()}
    step = start_step
    stopped_early = False
    last_loss = float("nan")
    while step < total_steps:
        t_data = time.perf_counter()
        micro = [next(batch_iter) for _ in range(accum)]
        for batch in micro:
            for sample_id, reason, message in batch.pop("faults"):
                logger.warning("skipped sample %r (%s): %s", sample_id, reason, message)
                tally.add(reason)
            if _supervised_tokens(batch):
                tally.add("trained_samples", batch["input_ids"].shape[0])
        t_compute = time.perf_counter()
        n_global = int(accelerator.reduce(torch.tensor(sum(_supervised_tokens(b) for b in micro), device=accelerator.device), "sum"))
        loss_sum = torch.zeros((), device=accelerator.device)
        if n_global:
            for batch in micro:
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                with accelerator.accumulate(model), accelerator.autocast():
                    summed = model(**batch, loss_reduction="sum", supervised_only=True).loss
                    # accelerate (and DeepSpeed's engine) divide by the accumulation steps; our
                    # normalisation is the global batch's token count, so that is undone here
                    accelerator.backward(summed * world * accum / n_global)
                loss_sum += summed.detach().float()
                window["samples"] += batch["input_ids"].shape[0] * world
                window["tokens"] += int(batch["attention_mask"].sum()) * world
            if not accelerator.sync_gradients:
                raise RuntimeError(f"accelerate's accumulation boundary is not at step {step + 1}'s last micro-batch")
            if cfg.max_grad_norm and not strategy.is_deepspeed(accelerator):  # DeepSpeed clips in its step
                accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            optimizer.step()  # under DeepSpeed a no-op: the engine stepped in the last backward
        elif accelerator.is_main_process:  # every sample of the global batch was skipped: no data, no update
            tally.add("updates_skipped")
        with warnings.catch_warnings():  # after a skipped update torch warns that the order looks wrong
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = float(accelerator.reduce(loss_sum, "sum")) / max(n_global, 1)
        window["data_s"] += t_compute - t_data
        window["compute_s"] += time.perf_counter() - t_compute
        progress.update(1)
        over_budget = False
        if cfg.time_budget_s is not None:  # one decision for all processes, or the others wait forever in a collective
            late = torch.tensor([float(time.perf_counter() - started > cfg.time_budget_s)], device=accelerator.device)
            over_budget = bool(accelerator.gather(late).max())
        if step % cfg.logging_steps == 0 or step == total_steps or over_budget:
            elapsed = time.perf_counter() - window["t0"]
            counts = tally.totals()
            record = {
                "step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                "samples_per_s": window["samples"] / elapsed, "tokens_per_s": window["tokens"] / elapsed,
                "data_s": window["data_s"], "compute_s": window["compute_s"],
                "elapsed_s": time.perf_counter() - started,
                "skipped_in_training": {k: v for k, v in counts.items() if k in IMAGE_FAULTS and v},
            }
            progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}",
                                 samples_s=f"{record['samples_per_s']:.1f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if accelerator.is_main_process:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            accelerator.log({k: v for k, v in record.items() if k not in ("step", "skipped_in_training")}, step=step)
            window = {"samples": 0, "tokens": 0, "data_s": 0.0, "compute_s": 0.0, "t0": time.perf_counter()}
        if (step % cfg.save_steps == 0 and step < total_steps) or over_budget:
            counts = tally.totals()
            ckpt.save_checkpoint(out, step, accelerator, unwrapped, scheduler,
                                 {"total_steps": total_steps, "run": run, "data": counts}, cfg.save_total_limit)
        if over_budget and step < total_steps:
            accelerator.print(f"time budget of {cfg.time_budget_s:.0f} s reached at step {step}/{total_steps}")
            stopped_early = True
            break
    progress.close()
    counts = tally.totals()
    accelerator.wait_for_everyone()
    report.skipped.update({k: v for k, v in counts.items() if k in IMAGE_FAULTS and v})
    report.trained = counts["trained_samples"]
    if report.skipped:
        logger.warning("data: skipped while training: %s", dict(report.skipped))
    summary = {
        "stage": cfg.stage, "steps": step, "total_steps": total_steps, "stopped_early": stopped_early,
        "final_loss": last_loss, "train_seconds": time.perf_counter() - started, "data": report.as_dict(),
        "updates_skipped": counts["updates_skipped"],
    }
    state_dict = accelerator.get_state_dict(model)  # on every process: gathers FSDP / ZeRO-3 shards
    if accelerator.is_main_process:
        summary["output"] = str(save_result(unwrapped, processor, cfg, state_dict))
        write_json(out / "summary.json", summary)
        curves.finish_run(out, total_steps)
    accelerator.end_training()
    return summary


# -- CLI -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """`llava-jp train`: its arguments (all of them, --help included) are parsed by train/config.py."""
    cfg, launch = parse_args(args.overrides)
    try:
        summary = train(cfg, resume=launch.resume, allow_resume_changes=launch.allow_resume_changes)
    except ResumeMismatch as err:  # the user changed the launch: say what, no traceback
        tqdm.write(f"error: {err}", file=sys.stderr)
        return 2
    except (DataError, ckpt.CheckpointError) as err:  # a bad sample under strict_data, a full disk, ...
        tqdm.write(f"error: {err}", file=sys.stderr)  # on its own line, under the progress bar
        return 1
    print(json.dumps(summary, ensure_ascii=False))
    return 0
