"""`llava-jp release`: folder contents, remote code, verification without llava_jp, card, push."""

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers.dynamic_module_utils import get_relative_import_files

from llava_jp.hub import probe as release_probe
from llava_jp.cli import main as cli_main
from llava_jp.hub.card import CardInfo, load_scores, render_model_card
from llava_jp.core import LlavaJpConfig, LlavaJpForConditionalGeneration, LlavaJpProcessor
from llava_jp.hub.release import AUTO_MAP, REMOTE_CODE, verify_release

SCORES = {"ja-vg-vqa-500": {"rougeL": 13.3312}, "heron-bench": {"conv": 51.0, "complex": 49.5, "detail": 50.6}}


@pytest.fixture(scope="module")
def released(tiny_dir, tmp_path_factory, hf_modules_cache):
    """The tiny model released through the CLI, sharded, with scores; (folder, report)."""
    root = tmp_path_factory.mktemp("release")
    scores = root / "scores.json"
    scores.write_text(json.dumps(SCORES), encoding="utf-8")
    out = root / "tiny-release"
    argv = ["release", "--model", str(tiny_dir), "--out", str(out), "--repo-id", "someone/tiny-llava-jp",
            "--max-shard-size", "200KB", "--scores", str(scores), "--base-model", "llm-jp/llm-jp-1.3b-v1.0",
            "--base-model", "google/siglip-so400m-patch14-384", "--dataset", "turing-motors/LLaVA-v1.5-Instruct-620K-JA"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli_main(argv) == 0
    printed = stdout.getvalue()
    return out, json.loads(printed[printed.index("{"):]), printed


def test_release_loads_without_llava_jp_and_matches_the_source(released):
    _, report, printed = released
    check = report["verification"]
    assert check["passed"] and check["same_prompt_ids"] and check["same_tokens"]
    assert check["tokens"] == 8 and check["source_tokens"] == check["release_tokens"]
    assert check["max_abs_logit_diff"] == 0.0
    assert check["model_class"].startswith("transformers_modules.")
    assert check["model_class"].endswith(".modeling.LlavaJpForConditionalGeneration")
    assert check["processor_class"].endswith(".processing.LlavaJpProcessor")
    assert check["llava_jp_imported"] is False
    assert "verified: loaded without llava-jp" in printed


# what a transformers user types, checked on the release in a process where `import llava_jp` fails
# (llava_jp/hub/probe.py: user_idioms, base_model_idiom)
USER_IDIOMS = [
    "auto_classes",  # AutoConfig / AutoModelForImageTextToText / AutoProcessor give our classes
    "auto_model_returns_hidden_states",  # AutoModel gives the base model (no head)
    "chat_template_renders_list_content",  # apply_chat_template on standard list-content messages
    "processor_returns_batchfeature",  # processor(images=..., text=prompt, return_tensors="pt")
    "ids_in_vocabulary", "image_token_in_vocabulary",  # every id, <image> included, is a vocabulary id
    "prompt_once",  # a rendered prompt is not wrapped again
    "generate_starts_with_prompt", "new_tokens_after_prompt", "decode_new_tokens",  # out[:, prompt_len:]
    "batch_decode_whole_output",
    "tokenize_true_same_tokens",  # apply_chat_template(tokenize=True, return_dict=True) + generate
    "pipeline_with_image_url",  # pipeline("image-text-to-text") with {"type": "image", "url": http://127.0.0.1/...}
]


@pytest.mark.parametrize("idiom", USER_IDIOMS)
def test_release_behaves_like_every_transformers_vlm(released, idiom):
    _, report, _ = released
    assert report["verification"]["idioms"][idiom] is True
    assert set(report["verification"]["idioms"]) == set(USER_IDIOMS)


def test_release_raises_no_deprecation_warning(released):
    _, report, _ = released
    assert report["verification"]["deprecation_warnings"] == []


def test_release_folder_holds_what_the_hub_needs(released, tiny_dir):
    out, _, _ = released
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_jp"
    assert config["auto_map"] == {k: v for k, v in AUTO_MAP.items() if k != "AutoProcessor"}
    assert set(AUTO_MAP) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoProcessor"}
    assert json.loads((out / "processor_config.json").read_text())["auto_map"] == {"AutoProcessor": AUTO_MAP["AutoProcessor"]}
    assert config["vision_config"]["vision_use_head"] is False
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    released_weights = {k: v for s in shards for k, v in load_file(out / s).items()}
    source_weights = load_file(tiny_dir / "model.safetensors")
    assert released_weights.keys() == source_weights.keys()
    assert not any(k.startswith("vision_tower.head.") for k in released_weights)
    assert all(torch.equal(released_weights[k], source_weights[k]) for k in source_weights)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "README.md"):
        assert (out / name).exists(), name
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    core = Path(LlavaJpConfig.__module__.replace(".", "/")).parent
    for name in REMOTE_CODE:  # transformers copied llava_jp/core/ verbatim
        assert (out / name).read_text() == (Path(__file__).parent.parent / core / name).read_text(), name
    assert not (out / "__init__.py").exists()


def test_release_leaves_no_auto_class_registered(released, tiny, tmp_path):
    """Registration is process-wide: a later save (a training checkpoint) must not ship code."""
    assert all(cls._auto_class is None for cls in (LlavaJpConfig, LlavaJpForConditionalGeneration, LlavaJpProcessor))
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert not (tmp_path / "modeling.py").exists() and "auto_map" not in json.loads((tmp_path / "config.json").read_text())


def test_transformers_ships_every_module_the_remote_code_needs(released):
    out, _, _ = released
    for entry in AUTO_MAP.values():
        module = entry.split(".")[0]
        needed = {p.rsplit("/", 1)[-1] for p in get_relative_import_files(str(out / f"{module}.py"))}
        if module == "modeling":
            assert needed == {"configuration.py", "projector.py", "templates.py", "vision.py", "vllm_compat.py"}
        if module == "processing":
            assert needed | {"processing.py"} == set(REMOTE_CODE)


def test_verification_catches_a_release_that_differs(released, tiny_dir, tmp_path, hf_modules_cache):
    out, _, _ = released
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    index = json.loads((tampered / "model.safetensors.index.json").read_text())
    shard = tampered / index["weight_map"]["language_model.lm_head.weight"]
    tensors = load_file(shard)
    tensors["language_model.lm_head.weight"] = tensors["language_model.lm_head.weight"] * 1.001
    save_file(tensors, shard, metadata={"format": "pt"})
    check = verify_release(tiny_dir, tampered, max_new_tokens=2)
    assert not check["passed"] and check["same_prompt_ids"] and check["max_abs_logit_diff"] > 0


def test_the_probe_process_cannot_import_llava_jp():
    code = ("import runpy; runpy.run_path({path!r})['block_llava_jp']()\n"
            "try:\n    import llava_jp.core.modeling\nexcept ImportError as e:\n    print('blocked:', e)")
    done = subprocess.run([sys.executable, "-I", "-c", code.format(path=release_probe.__file__)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("blocked: llava_jp") and done.returncode == 0


# -- model card ------------------------------------------------------------------------------
def _split_card(text):
    assert text.startswith("---\n")
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_released_card_has_hub_metadata_and_eval_table(released):
    out, _, _ = released
    meta, body = _split_card((out / "README.md").read_text(encoding="utf-8"))
    assert meta["license"] == "apache-2.0" and meta["language"] == ["ja"]
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["library_name"] == "transformers"
    assert meta["base_model"] == ["llm-jp/llm-jp-1.3b-v1.0", "google/siglip-so400m-patch14-384"]
    assert meta["datasets"] == ["turing-motors/LLaVA-v1.5-Instruct-620K-JA"]
    results = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "someone/tiny-llava-jp"
    assert [r["dataset"]["name"] for r in results] == ["ja-vg-vqa-500", "heron-bench"]
    assert results[1]["metrics"] == [{"type": "conv", "value": 51.0}, {"type": "complex", "value": 49.5},
                                     {"type": "detail", "value": 50.6}]
    assert "## 日本語" in body and "## English" in body
    assert body.count("| ja-vg-vqa-500 | rougeL | 13.33 |") == 2  # in both languages
    assert body.count("| heron-bench | detail | 50.60 |") == 2
    assert 'from_pretrained("someone/tiny-llava-jp", trust_remote_code=True)' in body
    assert "pip install" in body and "scaling-on-scales" in body
    assert "greedy generation (8 tokens) and logits matched the source model exactly" in body


def test_card_without_scores_or_names():
    model = {"vision": "siglip_vision_model", "vision_feature_layer": -2, "language_model": "gpt2",
             "projector": "mlp2x_gelu", "vision_layout": "default", "total_human": "1.86B",
             "image_tokens_per_image": 729, "projector_input_width": 2304, "image_size": 768,
             "s2_scales": [384, 768], "template": "plain", "prompt_example": "<image>"}
    meta, body = _split_card(render_model_card(CardInfo(model=model, license="cc-by-4.0")))
    assert meta["license"] == "cc-by-4.0" and "model-index" not in meta and "base_model" not in meta
    assert "スコア" not in body and "| resolution / 解像度 | 768 px, S2: 384 + 768 |" in body
    assert "| image tokens / 画像トークン数 | 729 x 2304 |" in body and "matched the source" not in body


def test_scores_file_formats(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"ja-vlm-bench": 44.4, "heron": {"avg": 50}}))
    assert load_scores(path) == {"ja-vlm-bench": {"score": 44.4}, "heron": {"avg": 50.0}}
    path.write_text(json.dumps({"heron": {"avg": "n/a"}}))
    with pytest.raises(ValueError, match=r"heron\.avg: expected a finite number"):
        load_scores(path)


# -- push and refusals -----------------------------------------------------------------------
def test_push_without_network_fails_clearly_after_writing_everything(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    out = tmp_path / "rel"
    code = cli_main(["release", "--model", str(tiny_dir), "--out", str(out), "--repo-id", "someone/x", "--push",
                     "--skip-verify"])
    err = capsys.readouterr().err
    assert code == 1
    assert "could not push to https://huggingface.co/someone/x" in err and f"Everything is written in {out}" in err
    assert "hf upload someone/x" in err
    assert (out / "config.json").exists() and (out / "README.md").exists() and (out / "modeling.py").exists()


def test_release_refusals(tiny_dir, tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("x")
    assert cli_main(["release", "--model", str(tiny_dir), "--out", str(tmp_path / "used"), "--skip-verify"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert cli_main(["release", "--model", str(tiny_dir), "--out", str(tmp_path / "new"), "--push"]) == 2
    assert "--push needs --repo-id" in capsys.readouterr().err


def test_missing_s2wrapper_names_the_pip_package(monkeypatch):
    import importlib.util

    import llava_jp.core.vision

    monkeypatch.setitem(sys.modules, "s2wrapper", None)  # makes `import s2wrapper` fail
    spec = importlib.util.spec_from_file_location("vision_without_s2", llava_jp.core.vision.__file__)
    with pytest.raises(ImportError, match="pip install scaling-on-scales"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
