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
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
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


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    """Write checkpoint-`step` atomically, then prune to the newest `keep` complete ones."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    remove_stale(output_dir)
    try:
        tmp.mkdir(parents=True)
        save_file(trainable_state_dict(model), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "files": files}), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        intact = complete_checkpoints(output_dir)
        kept = f"the newest complete checkpoint, {intact[-1]}, is intact" if intact else "there is no earlier checkpoint"
        raise CheckpointError(f"could not write {final} ({err}); {kept}. Free space and rerun with --resume.") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        _discard(old)
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


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore trainable weights, optimizer, scheduler and RNG; returns the saved state."""
    weights = load_file(path / "trainable.safetensors")
    missing = model.load_state_dict(weights, strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{path}: unexpected weights {missing.unexpected_keys[:5]}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- final output --------------------------------------------------------------------------------
def atomic_write(final: Path, write) -> None:
    """`write(tmp)`, then rename tmp to `final`; a failed write leaves `final` as it was."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        intact = complete_checkpoints(final.parent)
        kept = f"the newest complete checkpoint is {intact[-1]}" if intact else "there is no checkpoint"
        raise CheckpointError(f"could not write {final} ({err}); {kept}. Free space and rerun with --resume "
                                   "(it redoes the steps after that checkpoint).") from err


def save_result(model, processor, cfg, state_dict: dict) -> Path:
    """Stage 1: only the projector (safetensors). Stage 2: a full `from_pretrained` directory;
    with LoRA the adapter folder (and, with `lora_merge`, the merged model too).
    `state_dict` is the full model's, from `accelerator.get_state_dict` (which gathers FSDP /
    ZeRO-3 shards)."""
    out = Path(cfg.output_dir)
    if cfg.stage == 1:
        prefix = "multi_modal_projector."
        weights = {k[len(prefix):]: v.contiguous() for k, v in state_dict.items() if k.startswith(prefix)}
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
        model.save_pretrained(path, state_dict=state_dict)
        processor.save_pretrained(path)

    atomic_write(out / MODEL_SUBDIR, write)
    return out / MODEL_SUBDIR


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, path)
