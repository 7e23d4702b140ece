"""SIGKILL a `llava-jp train` run right after checkpoint `$LLAVA_JP_KILL_AFTER_CHECKPOINT` is complete:
a crash at a known point, without racing a run that may finish before a poller sees the checkpoint.

One process: `LLAVA_JP_KILL_AFTER_CHECKPOINT=N python -m tests.fakes.crash train --...`.
Under `accelerate launch`, `tests.fakes.gloo_devices` installs it with `launched=True`: rank 0 then
also kills the other ranks and the launcher.
"""

from __future__ import annotations

import os
import signal
import sys


def kill_after_checkpoint(step: int, launched: bool = False) -> None:
    import psutil

    from llava_jp.train import checkpoint as ckpt

    save = ckpt.save_checkpoint

    def save_then_die(output_dir, at, *args, **kwargs):
        path = save(output_dir, at, *args, **kwargs)  # returns on every process once it is complete
        if at == step and os.environ.get("RANK", "0") == "0":
            me = psutil.Process()
            victims = [me]
            if launched:  # the other ranks, then the launcher, then this one
                launcher = psutil.Process(os.getppid())
                victims = [*(p for p in launcher.children() if p.pid != me.pid), launcher, me]
            for process in victims:
                process.send_signal(signal.SIGKILL)
        return path

    ckpt.save_checkpoint = save_then_die


if __name__ == "__main__":
    from llava_jp.cli import main

    kill_after_checkpoint(int(os.environ["LLAVA_JP_KILL_AFTER_CHECKPOINT"]))
    sys.exit(main(sys.argv[1:]))
