"""`llava-jp train` in a forked child, with faults injected at named points.

The child SIGKILLs itself (or raises OSError(ENOSPC), a full disk) the first time it reaches
the point named `fault_at`. Points are the places a run can die in between: after an
optimizer step, half-way through writing any checkpoint or model file, just before any
rename, and half-way through pruning an old checkpoint. Every point reached is appended to
`journal` (so a clean run lists them all), with the checkpoints saved and loaded.

Children are forked from a `multiprocessing` forkserver that has imported torch and llava_jp
once, so a run costs about a second instead of the import time.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import types
from pathlib import Path

import torch
import transformers.modeling_utils
from safetensors.torch import save as safetensors_bytes

from llava_jp import cli
from llava_jp.train import checkpoint as ckpt
from llava_jp.train import loop

KILL, DISK_FULL = "kill", "disk_full"


def _label(path) -> str:
    path = Path(path)
    folder = path.parent.name.removesuffix(".tmp")
    return f"{folder}/{path.name}"


class Injector:
    def __init__(self, journal: str, fault_at: str | None, fault: str):
        self.journal = journal
        self.fault_at = fault_at
        self.fault = fault

    def note(self, text: str) -> None:
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def point(self, name: str, half_write: tuple[str, bytes] | None = None) -> None:
        """Reached `name`: record it; die (or fail) here if it is the chosen point."""
        self.note(f"point {name}")
        if name != self.fault_at:
            return
        if self.fault == DISK_FULL:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if half_write:
            path, data = half_write
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        injector = self
        save_file, torch_save, replace = ckpt.save_file, torch.save, os.replace
        discard, save_checkpoint, load_checkpoint = ckpt._discard, ckpt.save_checkpoint, ckpt.load_checkpoint
        build_optimizer, model_save = loop.build_optimizer, transformers.modeling_utils.safe_save_file

        def safetensors_write(original):
            def write(tensors, path, *args, **kwargs):
                injector.point(f"write {_label(path)}", (path, safetensors_bytes(tensors, *args[:1], **kwargs)))
                return original(tensors, path, *args, **kwargs)
            return write

        def pickle_write(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                buffer = io.BytesIO()
                torch_save(obj, buffer)
                injector.point(f"write {_label(f)}", (f, buffer.getvalue()))
            return torch_save(obj, f, *args, **kwargs)

        def rename(src, dst, *args, **kwargs):
            injector.point(f"rename {Path(src).name}")
            return replace(src, dst, *args, **kwargs)

        def prune(path):
            doomed = path.with_name(path.name + ".old")
            if injector.fault_at == f"prune {path.name}":  # die half-way: renamed, one file gone
                replace(path, doomed)
                next(doomed.iterdir()).unlink()
            injector.point(f"prune {path.name}")
            return discard(path)

        def saving(output_dir, step, *args, **kwargs):
            result = save_checkpoint(output_dir, step, *args, **kwargs)
            injector.note(f"saved {step}")
            return result

        def loading(path, *args, **kwargs):
            state = load_checkpoint(path, *args, **kwargs)
            injector.note(f"loaded {state['step']}")
            return state

        def optimizer(model, cfg):
            opt = build_optimizer(model, cfg)
            step = opt.step

            def counted_step(self, *args, **kwargs):
                result = step(*args, **kwargs)
                injector.point(f"step {int(next(iter(self.state.values()))['step'])}")
                return result

            opt.step = types.MethodType(counted_step, opt)  # a method: the lr scheduler wraps `step.__func__`
            return opt

        ckpt.save_file = safetensors_write(save_file)
        transformers.modeling_utils.safe_save_file = safetensors_write(model_save)
        torch.save = pickle_write
        os.replace = rename
        ckpt._discard = prune
        ckpt.save_checkpoint = saving
        ckpt.load_checkpoint = loading
        loop.build_optimizer = optimizer


def run(argv: list[str], journal: str, fault_at: str | None = None, fault: str = KILL) -> None:
    """The child: output to `journal`.log, one CPU thread (runs compare bit for bit), train."""
    log = os.open(journal + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    torch.set_num_threads(1)
    Injector(journal, fault_at, fault).install()
    sys.exit(cli.main(argv))
