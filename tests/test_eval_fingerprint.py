"""`llava-jp eval --out DIR` belongs to one model: another model's run there is refused."""

import json
import shutil

import torch

from llava_jp.cli import main as cli_main
from llava_jp.infer.load import load_model, save_model
from tests.fakes.eval_data import write_tiny_benchmarks


def _eval(model, out, data, max_new_tokens="4"):
    return cli_main(["eval", "--model", str(model), "--out", str(out), "--tasks", "ja-vg-vqa-500",
                     "--data", f"ja-vg-vqa-500={data['ja-vg-vqa-500']}", "--batch-size", "4",
                     "--max-new-tokens", max_new_tokens, "--device", "cpu"])


def test_another_models_run_in_the_same_out_is_refused_naming_both(tiny_dir, tmp_path, capsys):
    # item 5: B's run reused A's predictions and reported them as B's
    data = write_tiny_benchmarks(tmp_path / "data")
    model, processor = load_model(tiny_dir)
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(2.0)
    other = save_model(model, processor, tmp_path / "model_b")
    out = tmp_path / "out"
    assert _eval(tiny_dir, out, data) == 0
    predictions = (out / "predictions" / "ja-vg-vqa-500.jsonl").read_text(encoding="utf-8")
    capsys.readouterr()
    assert _eval(other, out, data) == 2
    err = capsys.readouterr().err
    recorded = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert str(tiny_dir) in err and str(other) in err and recorded["fingerprint"] in err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: --out")
    assert (out / "predictions" / "ja-vg-vqa-500.jsonl").read_text(encoding="utf-8") == predictions
    assert _eval(tiny_dir, out, data, max_new_tokens="8") == 2  # other generation settings: other answers
    assert _eval(tiny_dir, out, data) == 0  # the same model resumes
    copy = tmp_path / "copy_of_a"  # the same files elsewhere are the same model
    shutil.copytree(tiny_dir, copy)
    assert _eval(copy, out, data) == 0


def test_predictions_without_a_record_are_refused(tiny_dir, tmp_path, capsys):
    data = write_tiny_benchmarks(tmp_path / "data")
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "ja-vg-vqa-500.jsonl").write_text('{"id": "101", "prediction": "x"}\n', encoding="utf-8")
    assert _eval(tiny_dir, out, data) == 2
    assert "unrecorded model" in capsys.readouterr().err
