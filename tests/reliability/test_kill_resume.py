"""Item 2: runs killed (SIGKILL) at random points, during checkpoint saves included, or hit by
a full disk, resume from the last complete checkpoint and end with exactly the weights, losses
and data counts of an uninterrupted run (fp32, CPU, one thread)."""

import json
import multiprocessing
import os
import random
import re
import signal
import time

import pytest
import torch
from accelerate.utils.other import load as accelerate_load
from safetensors.torch import load_file

from llava_jp.train import checkpoint as ckpt

from tests.helpers import losses_by_step
from tests.reliability import kill_worker
from tests.reliability.conftest import SOAK, scaled
from tests.reliability.faults import image_sample, write_json

STEPS = 6
# where a kill lands, by kind; every CI run kills at least once in each
CATEGORIES = {
    "between steps": r"step \d+",
    "writing a checkpoint file": r"write checkpoint-\d+/.+",
    "before renaming a checkpoint into place": r"rename checkpoint-\d+\.tmp",
    "pruning an old checkpoint": r"(prune|rename) checkpoint-\d+",
    "writing the final model": r"write model/.+",
    "before renaming the model or summary": r"rename (model|summary\.json)\.tmp",
}
POINT = re.compile("|".join(f"({c})" for c in CATEGORIES.values()))


@pytest.fixture(scope="module")
def forkserver():
    """Children forked from a server that imported torch and llava_jp once (~1 s per run)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.reliability.kill_worker"])
    return ctx


@pytest.fixture(scope="module")
def run_data(train_workspace, tmp_path_factory):
    """The workspace data plus two broken images, so the fault counters must survive resumes too."""
    root = tmp_path_factory.mktemp("kill_data")
    (root / "truncated.png").write_bytes(next(train_workspace["images"].iterdir()).read_bytes()[:100])
    rows = json.loads(train_workspace["mixed"].read_text(encoding="utf-8"))
    rows += [image_sample("broken-missing", str(root / "missing.png")),
             image_sample("broken-truncated", str(root / "truncated.png"))]
    return write_json(root / "data.json", rows)


def _argv(ws, data, out, resume=False):
    return ["train", "--model", str(ws["base"]), "--data_path", str(data), "--image_folder", str(ws["images"]),
            "--output_dir", str(out), "--per_device_batch_size", "4", "--learning_rate", "1e-3",
            "--max_steps", str(STEPS), "--save_steps", "1", "--save_total_limit", "2", "--logging_steps", "1",
            "--warmup_ratio", "0", "--max_length", "256", "--seed", "5", *(["--resume"] if resume else [])]


def _run(ctx, argv, journal, fault_at=None, fault=kill_worker.KILL, kill_after=None) -> int:
    child = ctx.Process(target=kill_worker.run, args=(argv, str(journal), fault_at, fault))
    child.start()
    if kill_after is not None:
        child.join(kill_after)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
    child.join(180)
    assert not child.is_alive(), f"run hung: {journal}.log"
    return child.exitcode


def _journal(path, kind):
    return [line.split(" ", 1)[1] for line in path.read_text().splitlines() if line.startswith(kind + " ")] \
        if path.exists() else []


def _leftovers(out):
    return sorted(p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old"))
                  or (re.fullmatch(r"checkpoint-\d+", p.name) and not ckpt.is_complete(p)))


def _check_after_interruption(out, journal):
    """Every complete checkpoint loads, and none that was saved before the kill was lost."""
    complete = ckpt.complete_checkpoints(out)
    for path in complete:
        load_file(path / "trainable.safetensors")
        for name in ("optimizer.bin", "scheduler.pt"):
            torch.load(path / name, weights_only=True)
        accelerate_load(path / "random_states_0.pkl")  # weights_only, numpy's RNG state allowed
    saved = [int(s) for s in _journal(journal, "saved")]
    if saved:
        assert complete and int(complete[-1].name.split("-")[1]) >= saved[-1]
    return int(complete[-1].name.split("-")[1]) if complete else None


@pytest.fixture(scope="module")
def reference(forkserver, train_workspace, run_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    began = time.perf_counter()
    assert _run(forkserver, _argv(train_workspace, run_data, out), out / "journal") == 0
    points = [p for p in _journal(out / "journal", "point") if POINT.fullmatch(p)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["skipped_in_training"]  # the broken images came up
    return {"out": out, "points": points, "seconds": time.perf_counter() - began, "summary": summary,
            "weights": load_file(out / "model" / "model.safetensors"), "losses": losses_by_step(out)}


def _assert_same_as_reference(out, reference):
    weights = load_file(out / "model" / "model.safetensors")
    assert weights.keys() == reference["weights"].keys()
    assert all(torch.equal(weights[k], reference["weights"][k]) for k in weights)
    assert losses_by_step(out) == reference["losses"]
    assert json.loads((out / "summary.json").read_text())["data"] == reference["summary"]["data"]
    assert _leftovers(out) == []


def _plan(points, n_trials, rng):
    """Kill points: one per category first, then uniformly at random."""
    chosen = []
    for pattern in CATEGORIES.values():
        matching = [p for p in points if re.fullmatch(pattern, p)]
        assert matching, pattern
        chosen.append(rng.choice(matching))
    return (chosen + [rng.choice(points) for _ in range(max(0, n_trials - len(chosen)))])[:max(n_trials, len(chosen))]


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(forkserver, train_workspace, run_data, reference,
                                                                  tmp_path, checked):
    seed = int(os.environ.get("LLAVA_JP_KILL_SEED", time.time_ns() % 10**6 if SOAK else 0))
    rng = random.Random(seed)
    plan = _plan(reference["points"], scaled(7, 80), rng)
    timed = [rng.uniform(0, reference["seconds"]) for _ in range(scaled(3, 40))]
    kills = partial = 0
    for trial, fault_at in enumerate([*plan, *[None] * len(timed)]):
        out = tmp_path / f"trial-{trial}"
        # first run: killed at a chosen point (or after a random time); then up to one more kill while resuming
        faults = [(fault_at, None if fault_at else timed[trial - len(plan)])]
        faults.append((rng.choice(reference["points"]), None) if rng.random() < 0.5 else (None, None))
        for attempt, (point, after) in enumerate(faults):
            journal = out / f"journal-{attempt}"
            out.mkdir(exist_ok=True)
            newest = ckpt.complete_checkpoints(out)
            code = _run(forkserver, _argv(train_workspace, run_data, out, resume=attempt > 0), journal, point,
                        kill_after=after)
            if attempt > 0:  # a resume starts at the newest complete checkpoint
                loaded = _journal(journal, "loaded")
                assert loaded[:1] == ([newest[-1].name.split("-")[1]] if newest else []), (seed, trial)
            if code == 0:
                break
            assert code == -signal.SIGKILL, f"seed {seed} trial {trial}: exit {code}, see {journal}.log"
            kills += 1
            partial += bool(_leftovers(out) or (out / "model.tmp").exists())
            _check_after_interruption(out, journal)
        else:
            assert _run(forkserver, _argv(train_workspace, run_data, out, resume=True), out / "journal-final") == 0
        _assert_same_as_reference(out, reference)
    assert kills >= len(plan) and partial >= 1
    checked(f"trials (seed {seed}; LLAVA_JP_KILL_SEED reproduces)", len(plan) + len(timed))
    checked("SIGKILLs", kills)
    checked("kills that left a partial checkpoint or model behind (ignored, then removed)", partial)
    checked("kill points in a run", len(reference["points"]))


@pytest.mark.parametrize("point", ["write checkpoint-3/trainable.safetensors", "write checkpoint-3/optimizer.bin",
                                   "write model/model.safetensors"])
def test_a_full_disk_stops_with_a_clear_error_and_keeps_the_last_checkpoint(forkserver, train_workspace, run_data,
                                                                            reference, tmp_path, point, checked):
    journal = tmp_path / "journal"
    assert _run(forkserver, _argv(train_workspace, run_data, tmp_path), journal, point, kill_worker.DISK_FULL) == 1
    error = [line for line in (tmp_path / "journal.log").read_text().splitlines() if line.startswith("error: ")]
    newest = ckpt.complete_checkpoints(tmp_path)[-1]
    assert len(error) == 1 and "No space left on device" in error[0] and f"{newest}" in error[0], error
    assert newest.name == ("checkpoint-2" if "checkpoint-3" in point else "checkpoint-5")
    assert _check_after_interruption(tmp_path, journal) == int(newest.name.split("-")[1])
    assert _leftovers(tmp_path) == [] and not (tmp_path / "model.tmp").exists()
    assert _run(forkserver, _argv(train_workspace, run_data, tmp_path, resume=True), tmp_path / "journal-2") == 0
    _assert_same_as_reference(tmp_path, reference)
    checked(f"disk full at {point}: runs resumed to equal weights", 1)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(forkserver, train_workspace, run_data, reference,
                                                                   tmp_path, checked):
    assert _run(forkserver, _argv(train_workspace, run_data, tmp_path), tmp_path / "journal-0") == 0
    older, newest = ckpt.complete_checkpoints(tmp_path)
    damaged = newest / "optimizer.bin"
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # same size: it still looks complete
    assert _run(forkserver, _argv(train_workspace, run_data, tmp_path, resume=True), tmp_path / "journal-1") == 0
    assert _journal(tmp_path / "journal-1", "loaded") == [older.name.split("-")[1]]
    _assert_same_as_reference(tmp_path, reference)
    # a fresh run must not silently mix with an earlier run's checkpoints
    assert _run(forkserver, _argv(train_workspace, run_data, tmp_path), tmp_path / "journal-2") == 1
    assert "holds checkpoints of an earlier run" in (tmp_path / "journal-2.log").read_text()
    checked("damaged checkpoint skipped on resume", 1)
