"""DDP, FSDP (v2, `fully_shard`), DeepSpeed ZeRO-2 and ZeRO-3, each with 2 CPU processes (gloo),
launched with the shipped `scripts/accelerate/*.yaml` through `accelerate launch`.

For each strategy: (a) the per-step losses equal a 1-process run of the same global batch
(batch 8 = 2 x 4, accumulation 2, 4 optimizer steps) within 1e-5; (b) optimizer steps taken
(counted by torch's own optimizer hook on every process) == scheduler steps == logged steps;
(c) a launch SIGKILLed right after checkpoint-2, then `--resume`d, ends with the uninterrupted
run's losses and final weights (exactly: fp32, same process count).

DDP runs on accelerate's own CPU path (`ACCELERATE_USE_CPU=1`); FSDP and DeepSpeed run through
`tests/fakes/gloo_devices.py`, which only lets accelerate pick them on a CPU-only machine.
Marked `distributed` (skip locally with `-m "not distributed"`; CI runs them).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_jp.train import checkpoint as ckpt
from llava_jp.train.config import load_config
from llava_jp.train.loop import train

from tests.helpers import losses_by_step

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "scripts" / "accelerate"
STEPS = 4
STRATEGIES = {"ddp": "multi_gpu_ddp.yaml", "fsdp": "fsdp.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml"}


def _args(ws, out, per_device):
    return ["--model", str(ws["base"]), "--data_path", str(ws["mixed"]), "--image_folder", str(ws["images"]),
            "--stage", "2", "--learning_rate", "1e-3", "--max_steps", str(STEPS), "--logging_steps", "1",
            "--warmup_ratio", "0", "--max_length", "256", "--seed", "5", "--save_steps", "2",
            "--gradient_accumulation_steps", "2", "--per_device_batch_size", str(per_device), "--output_dir", str(out)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(kind, ws, out, *extra, env_extra=None):
    """`accelerate launch --config_file scripts/accelerate/<kind>.yaml`, 2 processes, fp32."""
    if kind.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is the `deepspeed` extra: pip install -e '.[deepspeed]'")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    if kind == "ddp":
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / STRATEGIES[kind]),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
           "-m", "tests.fakes.gloo_devices", "train", *_args(ws, out, 4), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def one_process(train_workspace, tmp_path_factory):
    """The reference: 1 process, batch 8, the same global batches."""
    out = tmp_path_factory.mktemp("one_process")
    values = dict(model=str(train_workspace["base"]), data_path=str(train_workspace["mixed"]),
                  image_folder=str(train_workspace["images"]), stage=2, learning_rate=1e-3, max_steps=STEPS,
                  logging_steps=1, warmup_ratio=0.0, max_length=256, seed=5, save_steps=2,
                  gradient_accumulation_steps=2, per_device_batch_size=8, output_dir=str(out), mixed_precision="no")
    train(load_config(None, **values))
    return losses_by_step(out)


def _weights(out):
    return load_file(Path(out) / "model" / "model.safetensors")


@pytest.mark.parametrize("kind", list(STRATEGIES))
def test_two_processes_match_one_and_resume_after_sigkill(kind, train_workspace, one_process, tmp_path):
    # (a) + (b): the uninterrupted 2-process run
    full = tmp_path / "full"
    counts = tmp_path / "counts"
    done = _launch(kind, train_workspace, full, env_extra={"LLAVA_JP_STEP_COUNTS": str(counts)})
    assert done.returncode == 0, done.stderr[-3000:]
    losses = losses_by_step(full)
    assert sorted(losses) == list(range(1, STEPS + 1))
    diff = max(abs(losses[s] - one_process[s]) for s in losses)
    assert diff < 1e-5, (losses, one_process)
    for rank in (0, 1):
        taken = json.loads(Path(f"{counts}.{rank}").read_text())
        assert taken == {"optimizer_steps": STEPS, "scheduler_steps": STEPS}, (rank, taken)
    state = ckpt.read_state(full / "checkpoint-2")
    # the engine asked for is the one that ran (accelerate on CPU would otherwise fall back to DDP)
    assert state["run"] == {"strategy": kind, "world_size": 2,
                            "per_device_batch_size": 4, "gradient_accumulation_steps": 2, "total_steps": STEPS}

    # (c): SIGKILL right after checkpoint-2, then --resume
    killed = tmp_path / "killed"
    crash = _launch(kind, train_workspace, killed, env_extra={"LLAVA_JP_KILL_AFTER_CHECKPOINT": "2"})
    assert crash.returncode != 0 and not (killed / "summary.json").exists()
    assert [p.name for p in ckpt.complete_checkpoints(killed)] == ["checkpoint-2"]
    resumed = _launch(kind, train_workspace, killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert losses_by_step(killed) == losses
    final, reference = _weights(killed), _weights(full)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    print(f"{kind}: max |loss - 1 process| over {STEPS} steps {diff:.1e}; resumed after SIGKILL: losses and weights equal")
