"""What a run logged, for people and plotting scripts: `trainer_state.json` (the log history in
the layout transformers' Trainer writes, which LLaVA-JP users plot from), a loss + learning-rate
PNG per stage, and `llava-jp plot RUN_DIR...` to draw several runs on one figure.

Everything is read from the run's `log.jsonl` (one record per logging step, appended by the
training loop; a resumed run logs the redone steps again, and the last record of a step wins).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava_jp.errors import UserError, existing_dir

LOG_FILE = "log.jsonl"
STATE_FILE = "trainer_state.json"
CURVES_FILE = "curves.png"


def read_log(run_dir: str | Path) -> list[dict]:
    """The run's records, one per logged step, in step order."""
    path = existing_dir(run_dir, "run folder") / LOG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {LOG_FILE} (not a training output folder, or nothing was logged yet)")
    by_step: dict[int, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
                continue
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def log_history(records: list[dict]) -> list[dict]:
    """Records in the Trainer's `log_history` names (`learning_rate`, not `lr`)."""
    renamed = []
    for r in records:
        entry = {("learning_rate" if k == "lr" else k): v for k, v in r.items()}
        renamed.append(entry)
    return renamed


def write_history(run_dir: str | Path, total_steps: int) -> Path:
    """`trainer_state.json` in `run_dir`, from its log."""
    from llava_jp.files import write_json

    records = read_log(run_dir)
    state = {"global_step": records[-1]["step"] if records else 0, "max_steps": total_steps,
             "log_history": log_history(records)}
    path = Path(run_dir) / STATE_FILE
    write_json(path, state)
    return path


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Loss (left) and learning rate (right) against the optimizer step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    runs = [(label, read_log(d)) for label, d in zip(labels or [Path(d).name for d in run_dirs], run_dirs)]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for label, records in runs:
        steps = [r["step"] for r in records]
        style = dict(label=label, linewidth=1.2, marker="o" if len(steps) < 10 else None)  # a short run stays visible
        ax_loss.plot(steps, [r["loss"] for r in records], **style)
        ax_lr.plot(steps, [r["lr"] for r in records], **style)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_loss.set_yscale("log")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def finish_run(run_dir: str | Path, total_steps: int) -> None:
    """End of a stage: its history JSON and its own curves next to `log.jsonl`."""
    write_history(run_dir, total_steps)
    if read_log(run_dir):
        plot_runs([run_dir], Path(run_dir) / CURVES_FILE)


# -- CLI -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="training output folders (each holds a log.jsonl)")
    parser.add_argument("--out", default="curves.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: the folder names)")


def run(args: argparse.Namespace) -> int:
    if args.labels and len(args.labels) != len(args.runs):
        raise UserError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    print(plot_runs(args.runs, args.out, args.labels))
    return 0
