"""What a stage leaves besides the model: trainer_state.json log history, a loss + LR curve PNG,
`llava-jp plot`; report_to refused at start when its package is missing; `llava-jp init` gives
both stages the same base weights."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_jp import LlavaJpForConditionalGeneration
from llava_jp.cli import main as cli_main
from llava_jp.errors import UserError
from llava_jp.train import curves
from llava_jp.train.config import load_config
from llava_jp.train.loop import train


def _cfg(ws, out, **kw):
    values = dict(model=str(ws["base"]), image_folder=str(ws["images"]), data_path=str(ws["mixed"]),
                  output_dir=str(out), per_device_batch_size=8, learning_rate=1e-3, logging_steps=1,
                  save_steps=1000, warmup_ratio=0.25, max_length=256, seed=3, max_steps=4)
    values.update(kw)
    return load_config(None, **values)


def test_each_stage_writes_its_history_and_curves(train_workspace, tmp_path):
    out = tmp_path / "run"
    summary = train(_cfg(train_workspace, out))
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == summary["steps"] == state["max_steps"] == 4
    assert [e["step"] for e in state["log_history"]] == [1, 2, 3, 4]
    assert [e["loss"] for e in state["log_history"]] == [r["loss"] for r in logged]
    assert [e["learning_rate"] for e in state["log_history"]] == [r["lr"] for r in logged]
    with Image.open(out / "curves.png") as png:
        assert png.size == (900, 340)


def test_resumed_steps_count_once_in_the_history(tmp_path):
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": l, "lr": 1e-3}) for s, l in
                                                  [(1, 3.0), (2, 2.0), (3, 1.5), (2, 2.1), (3, 1.6), (4, 1.0)])
                                        + '\n{"step": 5, "lo')  # torn by a kill mid-write
    assert [(r["step"], r["loss"]) for r in curves.read_log(tmp_path)] == [(1, 3.0), (2, 2.1), (3, 1.6), (4, 1.0)]


def test_plot_draws_several_runs_on_one_figure(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text("\n".join(
            json.dumps({"step": s, "loss": scale / s, "lr": 1e-3 * s / 10}) for s in range(1, 11)))
    assert cli_main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "c.png") as png:
        assert png.size == (900, 340)
    assert (tmp_path / "c.png").stat().st_size < 200_000


def test_report_to_without_its_package_fails_at_start(train_workspace, tmp_path, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "_available_trackers", [])
    with pytest.raises(UserError, match=r"report_to 'tensorboard': its package is not installed \(pip install tensorboard\)"):
        train(_cfg(train_workspace, tmp_path / "r", report_to=["tensorboard"]))
    assert not (tmp_path / "r").exists()  # nothing ran


def test_init_gives_both_stages_the_same_tower_and_lm(train_workspace, tmp_path):
    base = tmp_path / "base"
    assert cli_main(["init", "--preset", "tiny", "--out", str(base), "--seed", "5"]) == 0
    ws = {**train_workspace, "base": base}
    s1 = train(_cfg(ws, tmp_path / "s1", stage=1, template="plain", data_path=str(train_workspace["stage1"]), max_steps=1))
    s2 = train(_cfg(ws, tmp_path / "s2", stage=2, pretrained_projector=s1["output"], max_steps=1, learning_rate=0.0,
                    warmup_ratio=0.0))
    start = LlavaJpForConditionalGeneration.from_pretrained(base).state_dict()
    after = LlavaJpForConditionalGeneration.from_pretrained(s2["output"]).state_dict()
    for name in start:
        if name.startswith(("vision_tower.", "language_model.")):
            assert torch.equal(start[name], after[name]), name
    projector = load_file(s1["output"])
    assert all(torch.equal(after[f"multi_modal_projector.{k}"], v) for k, v in projector.items())
