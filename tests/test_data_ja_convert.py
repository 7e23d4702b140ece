"""`data_ja convert` on fixture rows in the hub datasets' own schemas."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_ja.cli import main
from data_ja.convert import convert

# turing-motors/LLaVA-Pretrain-JA: English in each turn's `value`, Japanese in its `jp`.
PRETRAIN_ROWS = [
    {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>",
         "jp": "写真の明確で簡潔な要約を作成してください。\n<image>"},
        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper",
         "jp": "高級家具3インチのジェルメモリーフォームマットレストッパーを選ぶ"}]},
    {"id": "002239345", "image": "00223/002239345.jpg", "conversations": [
        {"from": "human", "value": "Write a terse but informative summary of the picture.\n<image>",
         "jp": "写真の簡潔で有益な要約を書いてください。"},  # the translation lost <image>
        {"from": "gpt", "value": "a grey watch with an army style strap",
         "jp": "アーミースタイルのストラップが付いたグレーの時計"}]},
    {"id": "001013367", "image": "00101/001013367.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image concisely.",
         "jp": "＜画像＞\n画像を簡潔に説明してください。"},  # the tag itself got translated
        {"from": "gpt", "value": "the sun sets over the lake", "jp": " 湖に沈む夕日 "}]},
    {"id": "000512101", "image": "00051/000512101.jpg", "conversations": [
        {"from": "human", "value": "Give a brief description of the image.\n<image>",
         "jp": "画像の簡単な説明をしてください。\n<image>"},
        {"from": "gpt", "value": "a dog on the beach", "jp": ""}]},  # no translation
]

# turing-motors/LLaVA-v1.5-Instruct-620K-JA: Japanese in `value`.
INSTRUCT_ROWS = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\n画像のバスの色は何色ですか？"},
        {"from": "gpt", "value": "画像のバスは白と赤です。"},
        {"from": "human", "value": "バスの後ろには何がありますか？"},
        {"from": "gpt", "value": "バスの後ろには広告があります。"}]},
    {"id": "ja_roles", "image": "gqa/images/2354786.jpg", "conversations": [
        {"from": "ユーザー", "value": "<image>\n空は晴れていますか？"},
        {"from": "システム", "value": "はい、晴れています。"}]},
    {"id": "bad_role", "image": "gqa/images/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\n何が見えますか？"}, {"from": "bot", "value": "猫です。"}]},
    {"id": "empty_turn", "image": "gqa/images/2.jpg", "conversations": [
        {"from": "human", "value": "<image>\n何が見えますか？"}, {"from": "gpt", "value": "  "}]},
    {"id": "no_tag", "image": "ocr_vqa/images/3.jpg", "conversations": [
        {"from": "human", "value": "この本の著者は誰ですか？"}, {"from": "gpt", "value": "夏目漱石です。"}]},
    {"id": "english", "image": "textvqa/train_images/4.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is written on the sign?"},
        {"from": "gpt", "value": "The sign says stop."}]},
    {"image": "vg/VG_100K/5.jpg", "conversations": [  # no id
        {"from": "human", "value": "<image>\n木は何色ですか？"}, {"from": "gpt", "value": "緑色です。"}]},
    {"id": "text_only", "conversations": [
        {"from": "human", "value": "日本の首都はどこですか？"}, {"from": "gpt", "value": "東京です。"}]},
]


def _convert(tmp_path, rows, suffix=".json"):
    src = tmp_path / f"in{suffix}"
    if suffix == ".json":
        src.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif suffix == ".jsonl":
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                       encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / f"out{suffix}.json"
    report = convert(str(src), str(out))
    return json.loads(out.read_text(encoding="utf-8")), report


def test_pretrain_rows_take_japanese_from_jp_and_repair_the_image_tag(tmp_path):
    samples, report = _convert(tmp_path, PRETRAIN_ROWS)
    by_id = {s["id"]: s for s in samples}
    assert by_id["004539375"] == {"id": "004539375", "image": "00453/004539375.jpg",
                                  "conversations": [
                                      {"from": "human", "value": "写真の明確で簡潔な要約を作成してください。\n<image>"},
                                      {"from": "gpt", "value": "高級家具3インチのジェルメモリーフォームマットレストッパーを選ぶ"}]}
    # The lost tag goes back where the English had it (at the end).
    assert by_id["002239345"]["conversations"][0]["value"] == "写真の簡潔で有益な要約を書いてください。\n<image>"
    assert by_id["001013367"]["conversations"][0]["value"] == "<image>\n画像を簡潔に説明してください。"
    assert by_id["001013367"]["conversations"][1]["value"] == "湖に沈む夕日"
    assert report.rows_in == 4 and report.kept == 3 and report.dropped == 1
    assert report.drops == {"missing_japanese": 1}
    assert report.fixed == 2
    assert report.fixes == {"image_tag_restored": 1, "image_tag_normalised": 1,
                            "whitespace_trimmed": 1}
    assert report.examples["image_tag_restored"] == ["002239345"]


def test_instruct_rows_are_kept_fixed_or_dropped_by_reason(tmp_path):
    samples, report = _convert(tmp_path, INSTRUCT_ROWS)
    by_id = {s["id"]: s for s in samples}
    assert list(by_id) == ["000000033471", "ja_roles", "row-6", "text_only"]
    assert by_id["000000033471"] == INSTRUCT_ROWS[0]  # already clean: unchanged, order kept
    assert [t["from"] for t in by_id["ja_roles"]["conversations"]] == ["human", "gpt"]
    assert "image" not in by_id["text_only"]
    assert report.drops == {"bad_role": 1, "empty_turn": 1, "image_tag_mismatch": 1,
                            "not_japanese": 1}
    assert report.fixes == {"role_renamed": 1, "id_assigned": 1}
    assert (report.rows_in, report.kept, report.fixed, report.dropped) == (8, 4, 2, 4)
    assert report.examples["not_japanese"] == ["english"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_give_the_same_result_as_json(tmp_path, suffix):
    expected, _ = _convert(tmp_path, PRETRAIN_ROWS)
    got, _ = _convert(tmp_path, PRETRAIN_ROWS, suffix)
    assert got == expected


def test_hub_id_goes_through_datasets_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(PRETRAIN_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "pretrain.json"
    report = convert("turing-motors/LLaVA-Pretrain-JA", str(out))
    assert calls == [("turing-motors/LLaVA-Pretrain-JA", "train")]
    assert report.kept == 3
    assert json.loads(out.read_text(encoding="utf-8"))[0]["id"] == "004539375"


def test_cli_writes_output_and_report_and_counts_invalid_jsonl_lines(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(INSTRUCT_ROWS[0], ensure_ascii=False) + "\n{not json\n",
                   encoding="utf-8")
    out = tmp_path / "out.json"
    assert main(["convert", str(src), "--out", str(out)]) == 0
    report = json.loads((tmp_path / "out.json.report.json").read_text(encoding="utf-8"))
    assert report["rows_in"] == 2 and report["kept"] == 1
    assert report["drops"] == {"invalid_json": 1}
    assert report["examples"]["invalid_json"] == ["line 2"]
    assert len(json.loads(out.read_text(encoding="utf-8"))) == 1
