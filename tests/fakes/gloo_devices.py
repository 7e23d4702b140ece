"""Run `llava-jp` under `accelerate launch` on CPU as if the machine had one GPU per process,
so the FSDP and DeepSpeed configs of `scripts/accelerate/` run for real in tests.

accelerate (1.15) turns a config's FSDP or DeepSpeed into plain DDP when it runs on CPU
(`ACCELERATE_USE_CPU`): both are only selected on a GPU-like platform. This stand-in changes
exactly that choice -- the platform is a "GPU" whose device is the CPU and whose backend is
gloo -- and nothing else: accelerate's FSDP2 (`fully_shard`) and DeepSpeed code paths, DeepSpeed's
CPU accelerator (`DS_ACCELERATOR=cpu`, gloo without oneCCL) and our trainer run unchanged.

For tests it can also
- count optimizer and LR-scheduler steps from torch's own hooks (every optimizer DeepSpeed or
  FSDP drives is a `torch.optim.Optimizer`) and write them to `$LLAVA_JP_STEP_COUNTS.<rank>` at
  exit, so they are compared with the logged steps whatever the trainer itself reports;
- SIGKILL the whole launch (every rank and the launcher) right after checkpoint `$LLAVA_JP_KILL_AFTER_CHECKPOINT`
  is complete on every process (`tests.fakes.crash`).

DeepSpeed's CPU backend compiles a shared-memory all-reduce used only by inference
(`inference_all_reduce`); it is marked unavailable here, saving minutes of compilation on a
fresh machine without touching the training path.

Usage: accelerate launch --config_file CFG -m tests.fakes.gloo_devices train --...
"""

from __future__ import annotations

import atexit
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

_prepare_backend = PartialState._prepare_backend
_set_device = PartialState.set_device


def _gpu_like_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    if not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1 and not torch.cuda.is_available():
        return "gloo", DistributedType.MULTI_GPU
    return _prepare_backend(self, cpu, sagemaker_dp, backend)


def _cpu_device(self):
    if self.device is None and self.distributed_type == DistributedType.MULTI_GPU and not torch.cuda.is_available():
        self.device = torch.device("cpu")
        return
    _set_device(self)


def _count_steps(path: str) -> None:
    counts = {"optimizer_steps": 0, "scheduler_steps": 0}

    def optimizer_step(optimizer, args, kwargs):
        counts["optimizer_steps"] += 1

    register_optimizer_step_post_hook(optimizer_step)
    step = torch.optim.lr_scheduler.LRScheduler.step

    def scheduler_step(self, *args, **kwargs):
        if getattr(self, "_step_count", 0) >= 1:  # not the call torch makes when it builds a scheduler
            counts["scheduler_steps"] += 1
        return step(self, *args, **kwargs)

    torch.optim.lr_scheduler.LRScheduler.step = scheduler_step

    def write():
        rank = os.environ.get("RANK", "0")
        with open(f"{path}.{rank}", "w", encoding="utf-8") as f:
            json.dump(counts, f)

    atexit.register(write)


def _skip_inference_shm_op() -> None:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


PartialState._prepare_backend = _gpu_like_backend
PartialState.set_device = _cpu_device
if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
    _skip_inference_shm_op()
if os.environ.get("LLAVA_JP_STEP_COUNTS"):
    _count_steps(os.environ["LLAVA_JP_STEP_COUNTS"])
if os.environ.get("LLAVA_JP_KILL_AFTER_CHECKPOINT"):
    from tests.fakes.crash import kill_after_checkpoint

    kill_after_checkpoint(int(os.environ["LLAVA_JP_KILL_AFTER_CHECKPOINT"]), launched=True)

if __name__ == "__main__":
    from llava_jp.cli import main

    sys.exit(main(sys.argv[1:]))
