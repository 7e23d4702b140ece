"""The public data as published (tests/fakes/published.py): convert, training and eval read it."""

import json

from data_ja.convert import convert
from llava_jp.eval.tasks import load_task
from llava_jp.train.config import load_config
from llava_jp.train.data import encode_dataset, load_records
from llava_jp.train.loop import setup_model, train
from tests.fakes.eval_data import _heron_reference
from tests.fakes.published import write_heron_mirror, write_instruct_jsonl, write_pretrain_jsonl


def _cfg(workspace, tmp_path, data, **values):
    return load_config(None, model=str(workspace["base"]), data_path=str(data), image_folder=str(tmp_path / "images"),
                       output_dir=str(tmp_path / "run"), max_steps=1, per_device_batch_size=4, warmup_ratio=0.0,
                       max_length=256, **values)


def test_the_instruct_jsonl_with_list_images_trains_as_published(train_workspace, tmp_path):
    # item 6: rows whose `image` is a list of one path were dropped as malformed
    data = write_instruct_jsonl(tmp_path, tmp_path / "images")
    cfg = _cfg(train_workspace, tmp_path, data, stage=2)
    _, processor = setup_model(cfg)
    _, report = encode_dataset(*load_records(str(data)), processor, 256)
    assert report.dropped == {} and report.kept == 12
    summary = train(cfg)
    assert summary["data"]["kept"] == 12 and summary["steps"] == 1


def test_both_jsonl_files_convert_and_the_results_train(train_workspace, tmp_path):
    pretrain = write_pretrain_jsonl(tmp_path, tmp_path / "images")
    instruct = write_instruct_jsonl(tmp_path, tmp_path / "images")
    report = convert(str(pretrain), str(tmp_path / "stage1.json"))
    assert report.kept == 12 and report.dropped == 0
    rows = json.loads((tmp_path / "stage1.json").read_text(encoding="utf-8"))
    assert rows[0]["conversations"][1]["value"] == "赤い四角"  # the Japanese `jp`, not the English `value`
    report = convert(str(instruct), str(tmp_path / "stage2.json"))
    assert report.kept == 12 and report.fixes["image_list_unwrapped"] == 3
    summary = train(_cfg(train_workspace, tmp_path, tmp_path / "stage1.json", stage=1, template="plain"))
    assert summary["data"]["kept"] == 12


def test_eval_reads_the_heron_bench_mirror_repository(tmp_path):
    task = load_task("heron-bench", write_heron_mirror(tmp_path / "Japanese-Heron-Bench"))
    assert len(task.samples) == 6 and {s.category for s in task.samples} == {"conv", "detail", "complex"}
    # the reference is GPT-4's answer among the four models' in the `answer` struct
    assert [s.reference for s in task.samples] == [_heron_reference(int(s.id)) for s in task.samples]
    assert task.image(task.samples[0]).size == (16, 16)
