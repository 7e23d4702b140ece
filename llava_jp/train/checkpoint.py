"""Atomic checkpoints that hold only what trains, plus the state to resume exactly.

A checkpoint is written into `checkpoint-N.tmp/`, every file is flushed to disk, and only
then is the directory renamed to `checkpoint-N/` (a rename is atomic). `state.json`, written
last, lists every file with its size. A run killed mid-save leaves a `.tmp` directory that is
never mistaken for a checkpoint; old checkpoints are renamed to `.old` before they are deleted,
so a kill while pruning never leaves a half-deleted `checkpoint-N/`; leftovers of both are
removed at the next save or resume (`remove_stale`). A failed write (a full disk) removes
the partial directory and raises `CheckpointError`; the previous checkpoints are untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llava_jp.files import replace_atomically
from llava_jp.infer.load import parse_dtype, save_model
from llava_jp.train import strategy

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
SCHEDULER_FILE = "scheduler.pt"
PROJECTOR_FILE = "projector.safetensors"  # stage 1's output
MODEL_SUBDIR = "model"  # stage 2's output
_NAME = re.compile(r"checkpoint-(\d+)")
_LEFTOVER = re.compile(r"checkpoint-\d+\.(tmp|old)")


class CheckpointError(RuntimeError):
    """A checkpoint or the final model could not be written; the message says what is intact."""


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_dir():
            _fsync_tree(file)
            continue
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path)


def _discard(path: Path) -> None:
    """Delete a directory so that no half-deleted copy keeps its name: rename, then remove."""
    doomed = path.with_name(path.name + ".old")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale(output_dir: Path) -> list[str]:
    """Remove what killed or failed saves left behind: `checkpoint-N.tmp/`, `checkpoint-N.old/`,
    and `checkpoint-N/` directories that are not complete. Returns the names removed."""
    removed = []
    if not output_dir.is_dir():
        return removed
    for path in sorted(output_dir.iterdir()):
        if path.is_dir() and (_LEFTOVER.fullmatch(path.name) or (_NAME.fullmatch(path.name) and not is_complete(path))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _files(root: Path) -> dict[str, int]:
    """Every file under `root` (engines write sub-directories), relative path -> size."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _agree(accelerator, ok: bool) -> bool:
    """True when every process succeeded (a collective: a failure on one stops all of them)."""
    failed = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return not bool(accelerator.reduce(failed, "sum"))


def save_checkpoint(output_dir: Path, step: int, accelerator, model, scheduler, state: dict, keep: int) -> Path:
    """Write checkpoint-`step` atomically through `accelerator.save_state`, then prune to the
    newest `keep` complete ones. Every process calls it (FSDP / ZeRO state is written by all).

    Inside: accelerate's files (optimizer state -- sharded under FSDP / DeepSpeed --, one RNG
    file per process, the engine's model shards), `trainable.safetensors` (DDP / one process:
    only what trains, never the frozen tower), `scheduler.pt`, and `state.json` (our schedule
    and data tallies, and every file with its size), written last by the main process.
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    main = accelerator.is_main_process
    error: BaseException | None = None
    try:
        if main:
            remove_stale(output_dir)
            tmp.mkdir(parents=True)
    except OSError as err:
        error = err
    if _agree(accelerator, error is None):
        hook = None if strategy.saves_model_itself(accelerator) else \
            accelerator.register_save_state_pre_hook(lambda models, weights, where: weights.clear())
        try:
            accelerator.save_state(str(tmp), **strategy.save_state_kwargs(accelerator))
            if main:
                if hook is not None:
                    save_file(trainable_state_dict(model), tmp / TRAINABLE_FILE)
                torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        except OSError as err:
            error = err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if hook is not None:
                hook.remove()
        if _agree(accelerator, error is None) and main:
            try:
                (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "files": _files(tmp)}), encoding="utf-8")
                _fsync_tree(tmp)
                if final.exists():
                    _discard(final)
                os.replace(tmp, final)
                _fsync_dir(output_dir)
            except OSError as err:
                error = err
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    if not _agree(accelerator, error is None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        intact = complete_checkpoints(output_dir)
        kept = f"the newest complete checkpoint, {intact[-1]}, is intact" if intact else "there is no earlier checkpoint"
        reason = error or "another process could not write its part"
        raise CheckpointError(f"could not write {final} ({reason}); {kept}. Free space and rerun with --resume.") from error
    if main:
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def is_complete(path: Path) -> bool:
    """A checkpoint directory whose state file lists files that are all present, at their sizes."""
    state_file = path / STATE_FILE
    if not _NAME.fullmatch(path.name) or not state_file.is_file():
        return False
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    files = state.get("files") if isinstance(state, dict) else None
    if isinstance(files, list):  # written before sizes were recorded
        return bool(files) and all((path / name).is_file() for name in files)
    if not isinstance(files, dict) or not files:
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def load_checkpoint(path: Path, accelerator, model, scheduler) -> dict:
    """Restore what `save_checkpoint` wrote (every process calls it); returns the saved state.
    The checkpoint must hold every weight that trains now: a missing one is an error, not a
    silently untrained parameter."""
    hook = None
    if not strategy.saves_model_itself(accelerator):
        def load_trainable(models, where):
            models.clear()  # the frozen weights come from the base model, the rest from here
            weights = load_file(path / TRAINABLE_FILE)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            missing, unexpected = sorted(trainable - weights.keys()), sorted(weights.keys() - trainable)
            if missing or unexpected:
                raise ValueError(f"{path / TRAINABLE_FILE} does not match what trains now: "
                                 f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                                 f"not trainable {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            model.load_state_dict(weights, strict=False)

        hook = accelerator.register_load_state_pre_hook(load_trainable)
    try:
        accelerator.load_state(str(path), **strategy.load_state_kwargs(accelerator))
    finally:
        if hook is not None:
            hook.remove()
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    return read_state(path)


# -- final output --------------------------------------------------------------------------------
def atomic_write(final: Path, write) -> None:
    """`llava_jp.files.replace_atomically`, with a failed write (a full disk) told as what to do next."""
    try:
        replace_atomically(final, write)
    except OSError as err:
        intact = complete_checkpoints(final.parent)
        kept = f"the newest complete checkpoint is {intact[-1]}" if intact else "there is no checkpoint"
        raise CheckpointError(f"could not write {final} ({err}); {kept}. Free space and rerun with --resume "
                                   "(it redoes the steps after that checkpoint).") from err


def save_result(model, processor, cfg, state_dict: dict) -> Path:
    """Stage 1: only the projector (safetensors). Stage 2: a full `from_pretrained` directory;
    with LoRA the adapter folder (and, with `lora_merge`, the merged model too). In `cfg.save_dtype`
    (the dtype policy: `llava_jp.infer.load`).
    `state_dict` is the full model's, from `accelerator.get_state_dict` (which gathers FSDP /
    ZeRO-3 shards)."""
    out = Path(cfg.output_dir)
    dtype = parse_dtype(cfg.save_dtype, "save_dtype")
    if cfg.stage == 1:
        prefix = "multi_modal_projector."
        weights = {k[len(prefix):]: v.to(dtype).contiguous() for k, v in state_dict.items() if k.startswith(prefix)}
        atomic_write(out / PROJECTOR_FILE, lambda tmp: save_file(weights, tmp))
        return out / PROJECTOR_FILE

    if cfg.lora:
        from llava_jp.train import lora

        atomic_write(out / lora.ADAPTER_SUBDIR, lambda tmp: lora.save_adapter(model, processor, tmp))
        if not cfg.lora_merge:
            return out / lora.ADAPTER_SUBDIR
        merged = lora.merged_from(out / lora.ADAPTER_SUBDIR)
        model, state_dict = merged, merged.state_dict()

    def write(path: Path) -> None:
        save_model(model, processor, path, dtype, state_dict=state_dict)

    atomic_write(out / MODEL_SUBDIR, write)
    return out / MODEL_SUBDIR


