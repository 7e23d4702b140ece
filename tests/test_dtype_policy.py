"""The dtype policy (llava_jp/infer/load.py) on stand-ins built the way the hub has them: LMs
saved in float16 / bfloat16 (llm-jp v1 / llm-jp-3 configs), loaded through the preset path a
hub id takes; bf16-autocast training on CPU; what a bf16 run saves and how it reloads."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from transformers import GPT2Config, GPT2LMHeadModel, SiglipVisionConfig, SiglipVisionModel

from llava_jp import LlavaJpForConditionalGeneration
from llava_jp.eval import runner
from llava_jp.hub.release import release
from llava_jp.infer.load import load_model, save_model
from llava_jp.presets.tokenizers import build_bpe_tokenizer
from llava_jp.train.config import load_config
from llava_jp.train.loop import setup_model, train
from tests.helpers import write_preset


@pytest.fixture(autouse=True)
def _fresh_mixed_precision():
    """accelerate keeps one mixed-precision setting per process; these tests switch it."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def half_presets(tmp_path_factory):
    """Preset YAMLs whose LM is a local checkpoint saved in float16 / bfloat16, as published LMs
    are (transformers records the dtype in config.json and loads it back with dtype="auto")."""
    root = tmp_path_factory.mktemp("half_lms")
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                                 num_attention_heads=4, image_size=32, patch_size=8))
    tower.save_pretrained(root / "siglip")
    vocab = len(build_bpe_tokenizer())
    presets = {}
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        lm = GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=512, vocab_size=vocab,
                                        tie_word_embeddings=False, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))
        lm.to(dtype).save_pretrained(root / f"lm-{name}")
        assert json.loads((root / f"lm-{name}" / "config.json").read_text())["dtype"] == name
        presets[name] = write_preset(root / f"preset-{name}.yaml",
                                     vision={"name_or_path": str(root / "siglip"), "config": {}},
                                     language_model={"name_or_path": str(root / f"lm-{name}"), "config": {}})
    return presets


def _cfg(tmp_path, **values):
    defaults = dict(data_path="unused.json", output_dir=str(tmp_path / "run"))
    return load_config(None, **{**defaults, **values})


def _dtypes(module):
    return {p.dtype for p in module.parameters()}


@pytest.mark.parametrize("saved", ["float16", "bfloat16"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_trainable_parameters_are_float32_masters_whatever_the_lm_was_saved_in(half_presets, tmp_path, saved, precision):
    # item 1: transformers 5 would load these LMs in half precision and train them there
    model, _ = setup_model(_cfg(tmp_path, preset=str(half_presets[saved]), stage=2, mixed_precision=precision))
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    assert _dtypes(model.language_model) == {torch.float32}
    assert _dtypes(model.multi_modal_projector) == {torch.float32}
    assert _dtypes(model.vision_tower) == {compute}  # frozen: stored in the compute dtype
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_stage1_stores_the_frozen_lm_in_the_compute_dtype(half_presets, tmp_path):
    model, _ = setup_model(_cfg(tmp_path, preset=str(half_presets["float16"]), stage=1, mixed_precision="bf16"))
    assert _dtypes(model.language_model) == {torch.bfloat16} and _dtypes(model.vision_tower) == {torch.bfloat16}
    assert _dtypes(model.multi_modal_projector) == {torch.float32}
    model, _ = setup_model(_cfg(tmp_path, preset=str(half_presets["float16"]), stage=1, mixed_precision="no"))
    assert _dtypes(model) == {torch.float32}


def test_a_1e_5_update_on_a_bf16_loaded_lm_is_not_lost(half_presets, train_workspace, tmp_path):
    # item 1: at lr 1e-5 an AdamW step moves each weight by ~1e-5, below bf16's spacing (~1.2e-4
    # at 0.02): kept in bf16, nearly every weight would come back unchanged
    initial = GPT2LMHeadModel.from_pretrained(half_presets["bfloat16"].parent / "lm-bfloat16", dtype=torch.float32)
    cfg = _cfg(tmp_path, preset=str(half_presets["bfloat16"]), stage=2, mixed_precision="bf16",
               data_path=str(train_workspace["stage2"]), image_folder=str(train_workspace["images"]),
               max_steps=1, per_device_batch_size=4, learning_rate=1e-5, warmup_ratio=0.0, max_length=256)
    summary = train(cfg)
    tuned = LlavaJpForConditionalGeneration.from_pretrained(summary["output"])
    before = initial.transformer.h[0].mlp.c_fc.weight
    after = tuned.language_model.transformer.h[0].mlp.c_fc.weight
    changed = (after.float() != before).float().mean().item()
    assert changed > 0.9, f"only {changed:.1%} of the weights moved"
    assert (after.float() - before).abs().max().item() < 3e-5
    assert after.dtype == torch.float32


@pytest.fixture(scope="module")
def bf16_run(train_workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_run")
    cfg = load_config(None, model=str(train_workspace["base"]), stage=2, mixed_precision="bf16",
                      data_path=str(train_workspace["stage2"]), image_folder=str(train_workspace["images"]),
                      output_dir=str(out), max_steps=2, save_steps=1, per_device_batch_size=4,
                      learning_rate=1e-3, warmup_ratio=0.0, max_length=256, logging_steps=1)
    AcceleratorState._reset_state()
    summary = train(cfg)
    AcceleratorState._reset_state()
    return cfg, summary


def test_a_bf16_run_saves_and_records_float32(bf16_run):
    # item 2: the bf16-stored tower came first, so transformers recorded bfloat16 for the model
    _, summary = bf16_run
    config = json.loads((Path(summary["output"]) / "config.json").read_text())
    assert config["dtype"] == "float32"
    reloaded = LlavaJpForConditionalGeneration.from_pretrained(summary["output"])  # dtype="auto", as users load
    assert _dtypes(reloaded) == {torch.float32}


def test_a_bf16_trained_model_resumes_releases_verifies_and_evaluates(bf16_run, tmp_path, hf_modules_cache):
    cfg, first = bf16_run
    resumed = train(cfg, resume=True)  # from checkpoint-1: the optimizer state matches fp32 masters
    assert resumed["steps"] == 2
    report = release(resumed["output"], tmp_path / "release", max_new_tokens=2)
    assert report["verification"]["passed"]
    assert json.loads((tmp_path / "release" / "config.json").read_text())["dtype"] == "float32"
    model, _ = runner.load_model(resumed["output"], "cpu")
    assert _dtypes(model) == {torch.float32}
    answer = runner.model_generate_fn(resumed["output"], 2, "cpu")
    assert len(answer([Image.new("RGB", (40, 30), (200, 10, 10))], ["何色？"])) == 1


def test_save_dtype_is_deliberate_and_recorded(tiny, tmp_path):
    model, processor = tiny
    model.vision_tower.to(torch.bfloat16)  # as a bf16 run stores it
    save_model(model, processor, tmp_path / "bf16", "bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert _dtypes(LlavaJpForConditionalGeneration.from_pretrained(tmp_path / "bf16")) == {torch.bfloat16}
    loaded, _ = load_model(tmp_path / "bf16")  # the loader names the dtype: float32 by default
    assert _dtypes(loaded) == {torch.float32}
    assert load_model(tmp_path / "bf16", dtype="saved")[0].dtype == torch.bfloat16
    save_model(model, processor, tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(ValueError, match="save_dtype"):
        load_config(None, preset="tiny", data_path="x.json", save_dtype="int8")


def test_stage1_trains_the_projector_through_a_bf16_frozen_lm_with_checkpointing(train_workspace, tmp_path):
    # the stage-1 recipe: frozen LM and tower stored in bf16, bf16 autocast, activation checkpointing
    from safetensors.torch import load_file

    cfg = load_config(None, model=str(train_workspace["base"]), stage=1, template="plain", mixed_precision="bf16",
                      gradient_checkpointing=True, data_path=str(train_workspace["stage1"]),
                      image_folder=str(train_workspace["images"]), output_dir=str(tmp_path / "run"), max_steps=2,
                      per_device_batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, max_length=256)
    summary = train(cfg)
    projector = load_file(summary["output"])
    before = LlavaJpForConditionalGeneration.from_pretrained(train_workspace["base"]).multi_modal_projector
    assert projector["0.weight"].dtype == torch.float32
    assert not torch.equal(projector["0.weight"], before[0].weight.detach())
