"""Benchmarks load from local copies in each exact hub schema (no download)."""

import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from llava_jp.eval import TASKS, load_task
from tests.fakes.eval_data import (
    write_heron_files,
    write_heron_table,
    write_ja_vg_vqa,
    write_ja_vlm_wild,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {
        "vg_file": write_ja_vg_vqa(root / "vg" / "data" / "test-00000-of-00001.parquet"),
        "vg_dir": root / "vg",
        "wild": write_ja_vlm_wild(root / "wild.parquet"),
        "heron_table": write_heron_table(root / "heron.parquet"),
        "heron_files": write_heron_files(root / "heron-files"),
    }


def test_registry_names_hub_ids_and_metrics():
    assert {n: (t.hub_id, t.split, t.metric) for n, t in TASKS.items()} == {
        "ja-vg-vqa-500": ("SakanaAI/JA-VG-VQA-500", "test", "rouge-l"),
        "ja-vlm-bench-in-the-wild": ("SakanaAI/JA-VLM-Bench-In-the-Wild", "test", "rouge-l"),
        "heron-bench": ("turing-motors/Japanese-Heron-Bench", "train", "heron-bench"),
        "jmmmu": ("JMMMU/JMMMU", "test", "jmmmu"),
        "jdocqa": ("speed/JDocQA", "test", "jdocqa"),
        "mecha-ja": ("llm-jp/MECHA-ja", "test", "mecha-ja"),
    }


def test_fixture_parquet_has_the_hub_schema(data):
    vg = pq.read_schema(data["vg_file"])
    assert vg.names == ["image_id", "url", "width", "height", "coco_id", "flickr_id", "qas", "image"]
    qa_fields = [f.name for f in vg.field("qas").type.value_type]
    assert qa_fields == ["a_objects", "answer", "q_objects", "qa_id", "question"]
    assert pq.read_schema(data["wild"]).names == ["page_url", "image_url", "image", "question", "answer"]
    heron = pq.read_schema(data["heron_table"])
    assert heron.names == ["question_id", "image", "category", "image_category", "context", "text", "answer"]


def test_ja_vg_vqa_every_qa_is_a_sample(data):
    task = load_task("ja-vg-vqa-500", data["vg_file"])
    assert [(s.id, s.question, s.reference, s.row) for s in task.samples] == [
        ("101", "何色ですか？", "赤色です。", 0),
        ("102", "何がありますか？", "車があります。", 0),
        ("201", "空は何色？", "青い空です。", 1),
    ]
    assert task.metric == "rouge-l"
    image = task.image(task.samples[2])
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 255)  # the blue image of row 1


def test_ja_vg_vqa_sakana_protocol_keeps_first_qa_per_image(data):
    task = load_task("ja-vg-vqa-500", data["vg_file"], protocol="sakana")
    assert [s.id for s in task.samples] == ["101", "201"]


def test_folder_source_picks_the_split_by_file_name(data):
    task = load_task("ja-vg-vqa-500", data["vg_dir"])
    assert len(task.samples) == 3
    with pytest.raises(FileNotFoundError, match="split 'validation'"):
        load_task("ja-vg-vqa-500", data["vg_dir"], split="validation")


def test_save_to_disk_folder_loads(data, tmp_path):
    import datasets

    table = datasets.Dataset(pq.read_table(data["wild"]))
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "saved"))
    task = load_task("ja-vlm-bench-in-the-wild", tmp_path / "saved")
    assert [s.id for s in task.samples] == ["0", "1"]


def test_ja_vlm_bench_in_the_wild_rows_are_samples(data):
    task = load_task("ja-vlm-bench-in-the-wild", data["wild"])
    assert [(s.id, s.question, s.reference) for s in task.samples] == [
        ("0", "これは何の写真ですか？", "公園の写真です。"),
        ("1", "季節はいつですか？", "春です。"),
    ]
    assert task.image(task.samples[1]).getpixel((0, 0)) == (255, 255, 0)


@pytest.mark.parametrize("layout", ["heron_table", "heron_files"])
def test_heron_bench_loads_from_table_or_original_files(data, layout):
    task = load_task("heron-bench", data[layout])
    assert task.metric == "heron-bench"
    assert [s.category for s in task.samples] == ["complex", "conv", "detail"] * 2
    first = task.samples[0]
    assert (first.id, first.question, first.reference, first.context) == (
        "0",
        "この場所の特徴を説明してください。",
        "参照回答0です。",  # the gpt-4-0125-preview answer, not another model's
        "001.jpg は単色の画像です。",
    )
    r, g, b = task.image(task.samples[4]).getpixel((0, 0))
    assert r < 8 and g < 8 and b > 247  # 002.jpg is blue (JPEG in the file layout)


def test_limit_keeps_the_first_samples(data):
    assert [s.id for s in load_task("ja-vg-vqa-500", data["vg_file"], limit=2).samples] == ["101", "102"]


def test_wrong_schema_is_named(tmp_path, data):
    with pytest.raises(ValueError, match=r"lack column\(s\) \['qas'\]"):
        load_task("ja-vg-vqa-500", data["wild"])
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mmmu")


def test_heron_files_missing_reference_is_an_error(tmp_path):
    root = write_heron_files(tmp_path / "h")
    answers = (root / "answers_gpt4.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "answers_gpt4.jsonl").write_text("\n".join(answers[1:]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="question 0 has no context or GPT-4 answer"):
        load_task("heron-bench", root)


def test_duplicate_ids_are_refused(tmp_path):
    root = write_heron_files(tmp_path / "h")
    lines = (root / "questions_ja.jsonl").read_text(encoding="utf-8").splitlines()
    duplicated = json.loads(lines[1]) | {"question_id": 0}
    lines[1] = json.dumps(duplicated, ensure_ascii=False)
    (root / "questions_ja.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not unique"):
        load_task("heron-bench", root)
