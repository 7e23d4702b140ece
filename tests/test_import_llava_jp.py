"""Import of predecessor (LLaVA-JP v1.1) checkpoints, and the compat vision/prompt layouts."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import processors
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_jp import LlavaJpForConditionalGeneration, LlavaJpProcessor
from llava_jp.core import vision
from llava_jp.cli import main as cli_main
from llava_jp.core.configuration import VISION_LAYOUTS
from llava_jp.hub.import_v1 import convert
from llava_jp.hub.release import release
from llava_jp.synthetic import write_dataset
from llava_jp.presets.tokenizers import build_char_tokenizer
from llava_jp.train.config import load_config
from llava_jp.train.loop import train

RED = Image.new("RGB", (80, 50), (255, 0, 0))
SYSTEM_TURN = "これは好奇心旺盛なユーザーと人工知能システムのチャットです。システムはユーザーの質問に親切、詳細、丁寧に答える。"


def _eos_appending_tokenizer():
    """A char tokenizer that appends the end token by default, like llm-jp v1's."""
    tok = build_char_tokenizer()
    eos = tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tok.eos_token_id)]
    )
    return tok


def write_predecessor_checkpoint(root, weights_format="safetensors"):
    """A tiny checkpoint in the predecessor's key scheme with the tower named as the installed
    transformers names it (`model.vision_tower.vision_tower.*`, without 4.x's `vision_model.`
    level since transformers 5.6) and in float32: the other layout the import accepts. The files LLaVA-JP itself wrote are
    tests/fakes/llava_jp_v1_1.py (tests/test_import_predecessor_checkpoint.py).
    Returns (src dir, local SigLIP dir, reference parts)."""
    torch.manual_seed(3)
    tok = _eos_appending_tokenizer()
    siglip_dir = root / "siglip"
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                 num_attention_heads=2, image_size=32, patch_size=8))
    tower.save_pretrained(siglip_dir)
    gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=512,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id)
    lm = GPT2LMHeadModel(gpt2)
    projector = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 32))
    state = dict(lm.state_dict())
    state |= {f"model.vision_tower.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    state |= {f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()}
    config = gpt2.to_dict() | {
        "model_type": "llava-jp",
        "architectures": ["LlavaGpt2ForCausalLM"],
        "_name_or_path": "llm-jp/llm-jp-1.3b-v1.0",
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "scales": [1.0, 0.5],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 64,
        "use_mm_proj": True,
        "image_aspect_ratio": "square",
        "tokenizer_model_max_length": 1532,
        "tokenizer_padding_side": "right",
    }
    src = root / "predecessor"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if weights_format == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, src / "model.safetensors")
    else:
        torch.save(state, src / "pytorch_model.bin")
    tok.save_pretrained(src)
    return src, siglip_dir, {"state": state, "lm": lm.eval(), "tower": tower, "projector": projector, "tokenizer": tok}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    src, siglip_dir, ref = write_predecessor_checkpoint(root)
    out = root / "converted"
    assert cli_main(["import-llava-jp", "--src", str(src), "--out", str(out), "--vision-tower", str(siglip_dir)]) == 0
    return out, ref


def test_import_renames_every_weight_without_changing_it(imported):
    out, ref = imported
    model = LlavaJpForConditionalGeneration.from_pretrained(out).eval()
    ours = model.state_dict()
    for key, tensor in ref["state"].items():
        mapped = (key.replace("model.vision_tower.vision_tower.", "vision_tower.")
                  .replace("model.mm_projector.", "multi_modal_projector."))
        if key.startswith(("transformer.", "lm_head.")):
            mapped = "language_model." + key
        if ".head." in mapped:  # SigLIP's pooling head is never used: not imported
            assert mapped not in ours
            continue
        rows = tensor.shape[0]  # `<image>` may have grown the embedding by a row
        assert torch.equal(ours[mapped][:rows] if key in ("transformer.wte.weight", "lm_head.weight") else ours[mapped],
                           tensor), key
    ids = torch.tensor([[5, 9, 40, 41, 2]])
    with torch.no_grad():
        reference = ref["lm"](input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits[..., :reference.shape[-1]], reference)


def test_import_config_and_processor_follow_the_checkpoint(imported, capsys):
    out, _ = imported
    model = LlavaJpForConditionalGeneration.from_pretrained(out)
    processor = LlavaJpProcessor.from_pretrained(out)
    config = model.config
    assert config.vision_layout == "llava-jp-v1.1-compat"
    assert config.s2_scales == [32, 64] and config.s2_split_size == 32 and config.image_size == 64
    assert config.vision_feature_layer == -2 and config.projector_type == "mlp2x_gelu"
    assert model.num_image_tokens == processor.num_image_tokens == 4 * 4 - 1
    assert processor.prompt_layout == "llava-jp-v1.1-compat" and processor.template == "llm-jp-v1"
    assert processor.pad_to_square is False  # image_aspect_ratio "square": plain resize
    assert processor.image_processor.size == {"height": 64, "width": 64}
    assert config.text_config.model_type == "gpt2" and not hasattr(config.text_config, "mm_vision_tower")
    assert config.vision_config._name_or_path.endswith("siglip")


def test_imported_prompt_is_the_predecessors_token_for_token(imported):
    out, ref = imported
    processor = LlavaJpProcessor.from_pretrained(out)
    tok = ref["tokenizer"]
    question = "何色ですか？"
    batch = processor(text=[question], images=[RED])
    # the predecessor: the prompt split at <image>, each chunk tokenized with the tokenizer's
    # default special tokens, image ids spliced in between, the trailing end token cut off
    prompt = f"{SYSTEM_TURN} ユーザー: <image>\n{question} システム: "
    before, after = (tok(chunk)["input_ids"] for chunk in prompt.split("<image>"))
    image = processor.image_token_id
    assert processor.tokenizer.convert_ids_to_tokens(image) == "<image>"
    expected = before + [image] * 15 + after[:-1]
    assert before[-1] == tok.eos_token_id
    assert batch["input_ids"][0].tolist() == expected
    # the default layout is untouched: no end token before the image
    default = LlavaJpProcessor(image_processor=processor.image_processor, tokenizer=tok, num_image_tokens=15)
    assert default(text=[question], images=[RED])["input_ids"][0].tolist() == before[:-1] + [image] * 15 + after[:-1]


def test_imported_model_generates_and_trains(imported):
    out, _ = imported
    model = LlavaJpForConditionalGeneration.from_pretrained(out).eval()
    processor = LlavaJpProcessor.from_pretrained(out)
    batch = processor(text=["何色？", "形は？"], images=[RED, RED])
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    convs = [[{"role": "user", "content": "<image>\n何色？"}, {"role": "assistant", "content": "赤"}]]
    train = processor(conversations=convs, images=[RED])
    loss = model.train()(**train).loss
    loss.backward()
    assert torch.isfinite(loss) and model.multi_modal_projector[0].weight.grad is not None


def test_stage1_projector_pickle_imports_with_lm_and_tower(tmp_path):
    src, siglip_dir, ref = write_predecessor_checkpoint(tmp_path)
    lm_dir = tmp_path / "lm"
    ref["lm"].save_pretrained(lm_dir)
    (src / "model.safetensors").unlink()
    projector = {f"model.mm_projector.{k}": v for k, v in ref["projector"].state_dict().items()}
    torch.save(projector, src / "mm_projector.bin")
    model, _ = convert(str(src), tmp_path / "out", vision_tower=str(siglip_dir), language_model=str(lm_dir))
    for key, tensor in projector.items():
        assert torch.equal(model.state_dict()[key.replace("model.mm_projector.", "multi_modal_projector.")], tensor)
    for key, tensor in ref["tower"].state_dict().items():
        if not key.startswith("head."):  # SigLIP's pooling head is never used: not imported
            assert torch.equal(model.vision_tower.state_dict()[key], tensor), key
    for key, tensor in ref["lm"].state_dict().items():
        assert torch.equal(model.language_model.state_dict()[key][:tensor.shape[0]], tensor), key


class _NotATensor:
    pass


def test_pickles_holding_code_are_refused(tmp_path):
    src, siglip_dir, _ = write_predecessor_checkpoint(tmp_path, weights_format="bin")
    torch.save({"model.mm_projector.0.weight": _NotATensor()}, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        convert(str(src), tmp_path / "out", vision_tower=str(siglip_dir))


def test_bin_checkpoints_and_bad_checkpoints(tmp_path):
    src, siglip_dir, ref = write_predecessor_checkpoint(tmp_path, weights_format="bin")
    model, _ = convert(str(src), tmp_path / "out", vision_tower=str(siglip_dir))
    head = ref["state"]["lm_head.weight"]
    assert torch.equal(model.language_model.lm_head.weight[:head.shape[0]], head)
    state = dict(ref["state"]) | {"model.vision_resampler.weight": torch.zeros(1)}
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unknown predecessor weights.*vision_resampler"):
        convert(str(src), tmp_path / "out2", vision_tower=str(siglip_dir))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"architectures": ["LlavaLlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="only LlavaGpt2ForCausalLM"):
        convert(str(src), tmp_path / "out3", vision_tower=str(siglip_dir))


# -- the compat vision layout, at the real sizes ---------------------------------------------
def _patch_identity_siglip_384():
    """SigLIP 384/14 whose token at each patch is the patch's mean red value (every weight zero
    except the patch embedding), so a bright patch marks where its token ends up."""
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=384, patch_size=14)).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.zero_()
        tower.embeddings.patch_embedding.weight[:, 0] = 1.0 / (14 * 14)
    return tower


@pytest.mark.parametrize("crop,row,col", [((1, 0), 5, 20), ((0, 1), 0, 1), ((1, 1), 26, 26), ((0, 0), 13, 13)])
def test_compat_layout_is_a_26x28_grid_with_token_0_dropped(crop, row, col):
    # A bright patch at true 27x27 position (row, col) of one 384 crop of a 768 image is crop
    # token t = row * 27 + col. The predecessor put token t at (t - 1) // 28, (t - 1) % 28 of a
    # 26x28 grid, stitched the 2x2 crops to 52x56 and area-pooled to 26x28.
    tower = _patch_identity_siglip_384()
    image = torch.zeros(1, 3, 768, 768)
    top, left = crop[0] * 384 + row * 14, crop[1] * 384 + col * 14
    image[:, :, top:top + 14, left:left + 14] = 1.0
    with torch.no_grad():
        feats = vision.image_features_llava_jp_v1_1(tower, image, -1, s2_scales=[384, 768], s2_split_size=384)
        low_res = vision.crop_features(tower, F.interpolate(image, size=384, mode="bicubic"), -1)
    assert feats.shape == (1, 728, 16)
    high = feats[0, :, :8].mean(-1)  # channels 0..7: scale 1.0 (768 px) comes first
    t = row * 27 + col
    stitched_row, stitched_col = crop[0] * 26 + (t - 1) // 28, crop[1] * 28 + (t - 1) % 28
    expected = (stitched_row // 2) * 28 + stitched_col // 2
    assert int(high.argmax()) == expected and high[expected] == pytest.approx(0.25, abs=1e-6)
    assert torch.all(torch.cat([high[:expected], high[expected + 1:]]).abs() < 1e-6)
    # channels 8..15: scale 0.5 (one 384 crop), its tokens 1..728 in order (pooling 26x28 -> 26x28)
    torch.testing.assert_close(feats[0, :, 8:], low_res[0, 1:], rtol=0, atol=1e-6)


def test_compat_layout_drops_the_first_patch():
    tower = _patch_identity_siglip_384()
    image = torch.zeros(1, 3, 768, 768)
    image[:, :, :14, :14] = 1.0  # token 0 of the top-left crop
    with torch.no_grad():
        feats = vision.image_features_llava_jp_v1_1(tower, image, -1, s2_scales=[384, 768], s2_split_size=384)
        default = vision.image_features(tower, image, -1, s2_scales=[384, 768], s2_split_size=384)
    assert feats[0, :, :8].abs().max() == 0
    assert default.shape == (1, 729, 16) and default[0, 0, 8:].max() == pytest.approx(0.25, abs=1e-6)


def test_compat_layout_without_s2_and_layout_registry():
    tower = _patch_identity_siglip_384()
    x = torch.rand(2, 3, 384, 384)
    with torch.no_grad():
        torch.testing.assert_close(vision.image_features_llava_jp_v1_1(tower, x, -1), vision.crop_features(tower, x, -1)[:, 1:])
    assert set(vision.IMAGE_FEATURES) == set(VISION_LAYOUTS)
    assert vision.tokens_per_image(tower) == 729 and vision.tokens_per_image(tower, "llava-jp-v1.1-compat") == 728


def test_imported_model_releases_and_loads_without_llava_jp(imported, tmp_path, hf_modules_cache):
    out, _ = imported
    report = release(out, tmp_path / "release", base_models=["toshi456/llava-jp-1.3b-v1.1"], max_new_tokens=4)
    check = report["verification"]
    # the remote processor rebuilds the compat prompt and the remote model the compat features
    assert check["passed"] and check["same_prompt_ids"] and check["max_abs_logit_diff"] == 0.0
    assert check["model_class"].startswith("transformers_modules.") and not check["llava_jp_imported"]
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert config["vision_layout"] == "llava-jp-v1.1-compat"
    card = (tmp_path / "release" / "README.md").read_text(encoding="utf-8")
    assert "llava-jp-v1.1-compat (imported checkpoint)" in card and "| image tokens / 画像トークン数 | 15 x 64 |" in card


def test_imported_model_fine_tunes_with_the_stage2_pipeline(imported, tmp_path):
    out, ref = imported
    paths = write_dataset(tmp_path / "data", n_train=8, n_test=0, seed=0)
    cfg = load_config(None, model=str(out), stage=2, data_path=str(paths["stage2"]), image_folder=str(paths["images"]),
                      output_dir=str(tmp_path / "run"), max_steps=2, per_device_batch_size=4, learning_rate=1e-3,
                      warmup_ratio=0.0, max_length=256, logging_steps=1)
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["data"]["kept"] == 8 and math.isfinite(summary["final_loss"])
    tuned = LlavaJpForConditionalGeneration.from_pretrained(summary["output"])
    assert tuned.config.vision_layout == "llava-jp-v1.1-compat" and tuned.num_image_tokens == 15
    assert LlavaJpProcessor.from_pretrained(summary["output"]).prompt_layout == "llava-jp-v1.1-compat"
    head = ref["state"]["lm_head.weight"]
    assert not torch.equal(tuned.language_model.lm_head.weight[:head.shape[0]], head)
    for key, tensor in ref["tower"].state_dict().items():
        if not key.startswith("head."):  # SigLIP's pooling head is never used: not imported
            assert torch.equal(tuned.vision_tower.state_dict()[key], tensor), key
