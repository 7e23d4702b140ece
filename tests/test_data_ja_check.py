"""`data_ja check`: one planted defect of each kind is found, and a clean set raises nothing."""

import json
import random

import pytest
from PIL import Image
from transformers import AutoTokenizer

from data_ja.check import ERRORS, WARNINGS, check_dataset
from data_ja.cli import main
from llava_jp.core.templates import LLM_JP_V1_SYSTEM
from llava_jp.presets.tokenizers import build_char_tokenizer

CLEAN = [
    {"id": "c0", "image": "coco/0.jpg", "conversations": [
        {"from": "human", "value": "<image>\nバスは何色ですか？"},
        {"from": "gpt", "value": "バスは白と赤です。"}]},
    {"id": "c1", "image": "coco/1.png", "conversations": [
        {"from": "ユーザー", "value": "<image>\n人は何人いますか？"},
        {"from": "システム", "value": "3人います。"},
        {"from": "ユーザー", "value": "何をしていますか？"},
        {"from": "システム", "value": "歩いています。"}]},
    {"id": "c2", "conversations": [
        {"from": "human", "value": "日本の首都はどこですか？"}, {"from": "gpt", "value": "東京です。"}]},
]
PLANTED = {  # id -> the one defect planted in that sample
    "missing": ("missing_image", {"image": "coco/nowhere.jpg", "conversations": [
        {"from": "human", "value": "<image>\n何が見えますか？"}, {"from": "gpt", "value": "犬です。"}]}),
    "corrupt": ("corrupt_image", {"image": "coco/truncated.jpg", "conversations": [
        {"from": "human", "value": "<image>\n何が見えますか？"}, {"from": "gpt", "value": "猫です。"}]}),
    "role": ("bad_role", {"image": "coco/0.jpg", "conversations": [
        {"from": "human", "value": "<image>\n空は何色？"}, {"from": "bot", "value": "青です。"}]}),
    "empty": ("empty_turn", {"image": "coco/0.jpg", "conversations": [
        {"from": "human", "value": "<image>\n空は何色？"}, {"from": "gpt", "value": " "}]}),
    "order": ("bad_turn_order", {"conversations": [
        {"from": "gpt", "value": "こんにちは。"}, {"from": "human", "value": "元気です。"}]}),
    "tags": ("image_tag_mismatch", {"image": "coco/0.jpg", "conversations": [
        {"from": "human", "value": "空は何色ですか？"}, {"from": "gpt", "value": "青です。"}]}),
    "malformed": ("malformed_sample", {"image": "coco/0.jpg", "conversation": []}),
    "long": ("too_long", {"image": "coco/0.jpg", "conversations": [
        {"from": "human", "value": "<image>\n詳しく説明してください。"},
        {"from": "gpt", "value": "とても長い説明です。" * 90}]}),
    "cut": ("truncated", {"image": "coco/1.png", "conversations": [
        {"from": "human", "value": "<image>\n短く答えて。"}, {"from": "gpt", "value": "はい。"},
        {"from": "human", "value": "では詳しく。"}, {"from": "gpt", "value": "長い話です。" * 150}]}),
    "english": ("not_japanese", {"conversations": [
        {"from": "human", "value": "What is the capital of Japan?"},
        {"from": "gpt", "value": "Tokyo is the capital."}]}),
    "copy": ("duplicate", {k: v for k, v in CLEAN[0].items() if k != "id"}),
    "c1": ("duplicate_id", {"conversations": [
        {"from": "human", "value": "富士山の高さは？"}, {"from": "gpt", "value": "3776メートルです。"}]}),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    images = root / "images" / "coco"
    images.mkdir(parents=True)
    rng = random.Random(0)
    noise = Image.frombytes("RGB", (64, 64), bytes(rng.randrange(256) for _ in range(64 * 64 * 3)))
    noise.save(images / "0.jpg")
    Image.new("RGB", (16, 12), "red").save(images / "1.png")
    jpeg = (images / "0.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # header fine, pixels cut
    text = "".join(t["value"] for s in CLEAN + [v for _, v in PLANTED.values()]
                   for t in s.get("conversations", []))
    tokenizer = root / "tokenizer"
    build_char_tokenizer(text).save_pretrained(tokenizer)
    defective = CLEAN + [{"id": i, **sample} for i, (_, sample) in PLANTED.items()]
    for name, samples in (("clean", CLEAN), ("defective", defective)):
        (root / f"{name}.json").write_text(json.dumps(samples, ensure_ascii=False), "utf-8")
    return root, tokenizer


def _check(workspace, name, *extra):
    root, tokenizer = workspace
    out = root / f"{name}_report"
    status = main(["check", str(root / f"{name}.json"), "--image-folder", str(root / "images"),
                   "--tokenizer", str(tokenizer), "--out-dir", str(out), *extra])
    return status, json.loads((out / "report.json").read_text("utf-8")), out


def test_every_planted_defect_is_found_and_nothing_else(workspace):
    status, report, out = _check(workspace, "defective", "--strict")
    found = {(issue["id"], issue["kind"]) for issue in report["issues"]}
    assert found == {(sample_id, kind) for sample_id, (kind, _) in PLANTED.items()}
    assert status == 1 and report["ok"] is False
    assert set(report["errors"]) == set(ERRORS) - {"trainer_rejects"}
    assert set(report["warnings"]) == set(WARNINGS)
    assert report["samples_with_errors"] == 8
    assert report["token_lengths"]["over_max_length"] == 2
    summary = (out / "summary.md").read_text("utf-8")
    assert "NOT OK" in summary and "| error | corrupt_image | 1 | corrupt |" in summary
    with Image.open(out / "length_hist.png") as png:
        assert png.format == "PNG" and png.size[0] > 100


def test_a_clean_set_raises_nothing(workspace):
    status, report, out = _check(workspace, "clean", "--strict")
    assert status == 0 and report["ok"] is True
    assert report["issues"] == [] and report["errors"] == {} and report["warnings"] == {}
    assert report["token_lengths"]["count"] == 3
    assert "OK: nothing would break training" in (out / "summary.md").read_text("utf-8")


def test_errors_fail_only_in_strict_mode(workspace):
    status, report, _ = _check(workspace, "defective")
    assert status == 0 and report["ok"] is False


def test_token_lengths_are_the_training_sequence_lengths(workspace):
    _, tokenizer_path = workspace
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    # One token per character; the newline after <image> stays part of the text.
    question, reply = "\nバスは何色ですか？", "バスは白と赤です。"
    stage2 = (len(LLM_JP_V1_SYSTEM + " ユーザー: ") + 729 + len(question + " システム: " + reply)
              + 1)  # + the end token
    assert check_dataset([CLEAN[0]], tokenizer=tokenizer)[1] == [stage2]
    # Stage 1 ("plain"): <image>{caption}\n, the question is not part of the sequence.
    assert check_dataset([CLEAN[0]], tokenizer=tokenizer, template="plain")[1] == \
        [729 + len(reply) + 1]


def test_samples_the_trainer_would_drop_for_other_reasons_are_errors(workspace):
    _, tokenizer_path = workspace
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    # Stage 1 trains on captions of images: a text-only sample has nothing to caption.
    issues, _ = check_dataset([CLEAN[2]], tokenizer=tokenizer, template="plain")
    assert [(i.id, i.kind) for i in issues] == [("c2", "trainer_rejects")]
    assert "no image" in issues[0].detail
