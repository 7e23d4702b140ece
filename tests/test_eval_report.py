"""scores.json / markdown table / radar chart next to the published numbers."""

import json

from PIL import Image

from llava_jp.eval.report import PUBLISHED, headline, markdown_table, write_report

SCORES = {
    "model": "mine",
    "params": "1.9B",
    "protocol": "llm-jp-eval-mm",
    "tasks": {
        "ja-vg-vqa-500": {"metric": "rouge-l", "score": 14.256},
        "ja-vlm-bench-in-the-wild": {"metric": "rouge-l", "score": 45.0},
        "heron-bench": {
            "metric": "heron-bench", "score": 51.5, "judge_model": "judge-x", "style": "heron", "unparseable": 2,
        },
    },
}


def test_published_numbers_are_the_mission_table():
    assert PUBLISHED["llava-jp-1.3b-v1.1 (S2)"][1] == {
        "ja-vg-vqa-500": 13.33, "ja-vlm-bench-in-the-wild": 44.40, "heron-bench": 50.39,
    }
    assert PUBLISHED["EvoVLM-JP-v1-7B"][1]["ja-vlm-bench-in-the-wild"] == 51.25
    assert PUBLISHED["Heron-NVILA-Lite-2B (llm-jp-eval-mm)"][1] == {"heron-bench": 63.22}


def test_table_puts_our_row_above_the_published_rows():
    lines = markdown_table(SCORES).splitlines()
    assert lines[0] == (
        "| model | params | JA-VG-VQA-500 ROUGE-L | JA-VLM-Bench-In-the-Wild ROUGE-L | Heron-Bench avg |"
    )
    assert lines[2] == "| **mine** | 1.9B | **14.26** | **45.00** | **51.50** |"
    assert lines[3] == "| llava-jp-1.3b-v1.1 (S2) | 1.86B | 13.33 | 44.40 | 50.39 |"
    assert "| InternVL3-2B (llm-jp-eval-mm) |  | — | — | 55.28 |" in lines
    assert any("judge-x" in line and "2 unparseable" in line for line in lines)


def test_unscored_task_shows_a_dash():
    partial = {"model": "m", "tasks": {"heron-bench": {"score": None}, "ja-vg-vqa-500": {"score": 10.0}}}
    assert headline(partial) == {"ja-vg-vqa-500": 10.0}
    assert "| **m** |  | **10.00** | **—** | **—** |" in markdown_table(partial)


def test_write_report_files(tmp_path):
    paths = write_report(SCORES, tmp_path)
    assert json.loads(paths["scores"].read_text(encoding="utf-8")) == SCORES
    assert paths["table"].read_text(encoding="utf-8") == markdown_table(SCORES)
    with Image.open(paths["radar"]) as png:
        assert png.format == "PNG"
        # The chart is not blank: many distinct colours from the plotted series.
        assert len(png.convert("RGB").getcolors(maxcolors=100000)) > 20
