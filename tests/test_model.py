import json

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_jp import LlavaJpForConditionalGeneration, LlavaJpProcessor
from llava_jp.presets.builder import build
from llava_jp.cli import main as cli_main
from llava_jp.presets.tokenizers import build_char_tokenizer

from tests.helpers import byte_bpe_tokenizer, write_preset

RED = Image.new("RGB", (80, 50), (255, 0, 0))
BLUE = Image.new("RGB", (40, 40), (0, 0, 255))


def _qa(question="<image>\n何色？", answer="赤"):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_save_load_round_trip_identical_logits(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_proc = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, LlavaJpForConditionalGeneration) and isinstance(loaded_proc, LlavaJpProcessor)
    batch = processor(text=["何色？", "形は？"], images=[RED, BLUE])
    batch2 = loaded_proc(text=["何色？", "形は？"], images=[RED, BLUE])
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    assert torch.equal(batch["pixel_values"], batch2["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch2).logits)
    assert loaded.generation_config.eos_token_id == processor.tokenizer.eos_token_id


def _save_components(tmp_path, lm_kind="gpt2", full_siglip=False):
    torch.manual_seed(1)
    tokenizer = byte_bpe_tokenizer(bos=lm_kind == "llama")
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                            image_size=32, patch_size=8)
    vision_dir = tmp_path / "siglip"
    if full_siglip:  # hub SigLIP checkpoints hold the text tower too
        from transformers import SiglipTextConfig
        SiglipModel(SiglipConfig(vision_config=vc.to_dict(),
                                 text_config=SiglipTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                              num_attention_heads=2, vocab_size=50).to_dict())).save_pretrained(vision_dir)
        vision_ref = SiglipVisionModel.from_pretrained(vision_dir)
    else:
        vision_ref = SiglipVisionModel(vc)
        vision_ref.save_pretrained(vision_dir)
    if lm_kind == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=512,
                                        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id))
    else:
        lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=512,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    lm_dir = tmp_path / "lm"
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    preset = write_preset(
        tmp_path / "preset.yaml",
        vision={"name_or_path": str(vision_dir), "s2_scales": [32, 64], "s2_split_size": 32},
        language_model={"name_or_path": str(lm_dir)},
        tokenizer=str(lm_dir),
    )
    return preset, vision_ref, lm


@pytest.mark.parametrize("lm_kind,full_siglip", [("gpt2", False), ("gpt2", True), ("llama", False)])
def test_build_from_local_checkpoints_loads_their_weights(tmp_path, lm_kind, full_siglip):
    preset, vision_ref, lm_ref = _save_components(tmp_path, lm_kind, full_siglip)
    model, processor = build(str(preset), pretrained=True)
    tower = model.vision_tower.state_dict()
    for name, tensor in vision_ref.state_dict().items():
        if name.startswith("head."):  # SigLIP's pooling head is never used: dropped
            assert name not in tower
            continue
        assert torch.equal(tower[name], tensor), name
    assert not model.config.vision_config.vision_use_head
    # this LM has no spare embedding row: `<image>` gets one more (mean-initialised) row
    vocab = lm_ref.config.vocab_size
    assert processor.image_token_id == vocab == model.config.image_token_id
    assert model.language_model.get_input_embeddings().num_embeddings == vocab + 1
    for name, tensor in lm_ref.state_dict().items():
        ours = model.language_model.state_dict()[name]
        assert torch.equal(ours[:vocab] if ours.shape[0] == vocab + 1 else ours, tensor), name
    assert model.projector_input_width == 64 and model.num_image_tokens == 16
    # the assembled VLM saves and reloads as one model
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    reloaded = LlavaJpForConditionalGeneration.from_pretrained(tmp_path / "vlm").eval()
    batch = processor(text=["これは何？"], images=[RED])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, reloaded(**batch).logits, rtol=0, atol=0)
        out = reloaded.generate(**batch, max_new_tokens=4, do_sample=False)
    prompt_len = batch["input_ids"].shape[1]
    assert out.shape[0] == 1 and 1 <= out.shape[1] - prompt_len <= 4


def test_tokenizer_larger_than_vocab_is_refused(tmp_path):
    preset = write_preset(tmp_path / "p.yaml", language_model={"config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1,
                                                                           "n_head": 2, "vocab_size": 10}})
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        build(str(preset), pretrained=False)


def test_text_only_batch_does_not_run_the_vision_tower(tiny):
    model, processor = tiny
    calls = []
    model.vision_tower.embeddings.register_forward_hook(lambda *a: calls.append(1))
    batch = processor(conversations=[_qa("こんにちは", "はい"), _qa("元気？", "元気")])
    assert "pixel_values" not in batch
    loss = model(**batch).loss
    assert torch.isfinite(loss) and calls == []


def test_mixed_batch_places_each_image_in_its_own_sample(tiny):
    model, processor = tiny
    convs = [_qa("<image>\n何色？", "赤"), _qa("こんにちは", "はい"), _qa("形は？\n<image>", "丸")]
    batch = processor(conversations=convs, images=[RED, None, BLUE])
    batch.pop("labels")
    assert batch["pixel_values"].shape[0] == 2
    with torch.no_grad():
        mixed = model(**batch).logits
        for i, (conv, image) in enumerate(zip(convs, [RED, None, BLUE])):
            alone = processor(conversations=[conv], images=[image] if image else None)
            alone.pop("labels")
            n = alone["input_ids"].shape[1]
            torch.testing.assert_close(mixed[i, :n], model(**alone).logits[0], atol=1e-5, rtol=1e-4)


def test_placeholder_feature_mismatch_is_a_clear_error(tiny):
    model, processor = tiny
    batch = processor(conversations=[_qa()], images=[RED])
    batch["input_ids"] = batch["input_ids"][:, 1:]  # drop nothing image-related: still fine
    batch["attention_mask"] = batch["attention_mask"][:, 1:]
    batch["labels"] = batch["labels"][:, 1:]
    model(**batch)
    two_images = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(ValueError, match=r"placeholder tokens \(16\) do not match image features \(2 images"):
        model(input_ids=batch["input_ids"], pixel_values=two_images)
    with pytest.raises(ValueError, match=r"\(16\) do not match image features \(0 images"):
        model(input_ids=batch["input_ids"])


def test_loss_only_counts_supervised_tokens(tiny):
    model, processor = tiny
    batch = processor(conversations=[_qa()], images=[RED])
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits[0, :-1]
        targets = batch["labels"][0, 1:]
        keep = targets != -100
        expected = torch.nn.functional.cross_entropy(full[keep], targets[keep])
        standard = model(**batch)
        out = model(**batch, supervised_only=True)
    torch.testing.assert_close(standard.loss, expected)
    assert standard.logits.shape == (1, batch["input_ids"].shape[1], model.config.text_config.vocab_size)
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape[0] == int(keep.sum()) == 2  # "赤" + end token


def test_logits_to_keep_gives_the_last_positions(tiny):
    model, processor = tiny
    batch = processor(text=["何色？"], images=[RED])
    with torch.no_grad():
        full = model(**batch).logits
        last = model(**batch, logits_to_keep=1).logits
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last[0, 0], full[0, -1])


def test_greedy_generate_is_deterministic_and_batch_independent(tiny):
    model, processor = tiny
    questions, images = ["何色？", "こんにちは、形は何ですか？"], [RED, None]
    batch = processor(text=questions, images=images)
    first = model.generate(**batch, max_new_tokens=8, do_sample=False)
    second = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, second)
    new = first[:, batch["input_ids"].shape[1]:]
    for i, (q, im) in enumerate(zip(questions, images)):
        one = processor(text=[q], images=[im])
        alone = model.generate(**one, max_new_tokens=8, do_sample=False)
        assert torch.equal(alone[0, :one["input_ids"].shape[1]], one["input_ids"][0])  # prompt + new tokens
        alone_new = alone[0, one["input_ids"].shape[1]:]
        assert torch.equal(alone_new, new[i, : alone_new.shape[0]])


def test_generate_stops_at_the_end_token(tiny):
    model, processor = tiny
    eos = processor.tokenizer.eos_token_id
    lm = model.language_model
    with torch.no_grad():  # make the end token the argmax everywhere
        lm.transformer.ln_f.weight.zero_()
        lm.transformer.ln_f.bias.fill_(1.0)
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[eos] = 1.0
    batch = processor(text=["何色？"], images=[RED])
    prompt_len = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert out[:, prompt_len:].tolist() == [[eos]]
    with torch.no_grad():
        lm.lm_head.weight[eos] = 0.0
        lm.lm_head.weight[5] = 1.0
    out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert out.shape == (1, prompt_len + 10)


def test_generate_never_emits_the_image_token(tiny):
    model, processor = tiny
    lm = model.language_model
    with torch.no_grad():  # make `<image>` the argmax everywhere, then the end token the runner-up
        lm.transformer.ln_f.weight.zero_()
        lm.transformer.ln_f.bias.fill_(1.0)
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[processor.image_token_id] = 2.0
        lm.lm_head.weight[processor.tokenizer.eos_token_id] = 1.0
    batch = processor(text=["何色？"], images=[RED])
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out[0, batch["input_ids"].shape[1]:].tolist() == [processor.tokenizer.eos_token_id]


def test_generate_uses_the_kv_cache(tiny):
    model, processor = tiny
    lengths = []
    model.language_model.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"].shape[1]),
        with_kwargs=True,
    )
    batch = processor(text=["何色？"], images=[RED])
    model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert lengths[0] == batch["input_ids"].shape[1] and lengths[1:] == [1, 1, 1, 1]


def test_info_full_preset_matches_published_size(capsys):
    assert cli_main(["info", "--preset", "llava-jp-1.3b-s2"]) == 0
    info = json.loads(capsys.readouterr().out)
    # the predecessor's published 1.86B counts SigLIP's pooling head (18M), which is never used
    assert abs(info["parameters"]["total"] / 1e9 - 1.842) <= 0.001
    assert info["total_human"] == "1.84B"
    assert info["image_tokens_per_image"] == 729 and info["projector_input_width"] == 2304


def test_info_on_a_saved_model(tiny_dir, capsys):
    assert cli_main(["info", "--model", str(tiny_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["image_tokens_per_image"] == 16 and info["projector_input_width"] == 256


def test_tiny_preset_builds_fast():
    import time
    start = time.perf_counter()
    build("tiny", pretrained=False)
    assert time.perf_counter() - start < 2.0


def test_char_tokenizer_round_trips_japanese():
    tok = build_char_tokenizer()
    text = "これは赤い丸です。\n数字は7！"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_generate_returns_an_ordinary_tensor_that_callers_may_modify(tiny):
    model, processor = tiny
    out = model.generate(**processor(text=["何色？"], images=[RED]), max_new_tokens=3, do_sample=False)
    assert not out.is_inference()
    out += 1  # an inference-mode tensor would raise here


def test_base_model_gives_the_hidden_states_the_head_reads(tiny, tmp_path):
    """`AutoModel` on a saved folder is the base model (no head); the head model's logits are the
    LM head applied to its hidden states. One checkpoint loads into both."""
    from transformers import AutoModel

    from llava_jp import LlavaJpModel

    model, processor = tiny
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is LlavaJpModel and set(base.state_dict()) == set(model.state_dict())
    batch = processor(text=["何色？"], images=[RED])
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
        logits = model(**batch).logits
    torch.testing.assert_close(model.get_output_embeddings()(hidden), logits, rtol=0, atol=0)


def test_what_vllms_transformers_backend_needs_from_the_model(tiny):
    from transformers import AutoModel

    from llava_jp import LlavaJpModel

    model, processor = tiny
    base = AutoModel.from_config(model.config)
    assert type(base) is LlavaJpModel and base._supports_attention_backend
    decoder = base.get_decoder()
    assert decoder is base.language_model.base_model and type(decoder)._supports_attention_backend
    assert not any(".head." in name for name, _ in base.named_parameters())  # no pooling head
    assert base.config.vision_config.vision_use_head is False
    features = model.get_image_features(processor(text=["何色？"], images=[RED])["pixel_values"])
    assert features.shape == (1, model.num_image_tokens, model.config.text_config.hidden_size)


def test_vllm_skips_none_of_our_weights_when_it_loads_a_gpt2_lm(tiny):
    """vLLM's Transformers backend drops every checkpoint weight that one of the model's
    `_keys_to_ignore_on_load_unexpected` `search`es (vllm/model_executor/models/transformers/base.py,
    WeightsMapper); GPT-2's own "attn.bias" matched every c_attn.bias."""
    import re

    from transformers import AutoModel

    model, _ = tiny
    base = AutoModel.from_config(model.config)
    patterns = [re.compile(p) for p in base._keys_to_ignore_on_load_unexpected]
    assert [n for n in base.state_dict() if any(p.search(n) for p in patterns)] == []
    # what the patterns are for in transformers still holds: GPT-2's old mask buffers are unexpected, silently
    assert any(p.search("language_model.transformer.h.0.attn.bias") for p in patterns)


def test_gpt2_lm_gives_the_same_hidden_states_under_vllms_attention_output_shape(tiny, monkeypatch):
    """vLLM's attention (vllm_attention_forward, batch 1) returns (tokens, heads * head_dim), not
    transformers' (batch, seq, heads, head_dim); GPT-2 flattened that to one vector."""
    import copy

    import torch.nn.functional as F
    from transformers import AutoModel
    from transformers.modeling_utils import AttentionInterface

    def vllm_shaped_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).reshape(query.shape[-2], -1), None

    monkeypatch.setitem(AttentionInterface._global_mapping, "vllm-shaped", vllm_shaped_attention)
    model, processor = tiny
    reference = AutoModel.from_config(model.config).eval()
    reference.load_state_dict(model.state_dict())
    config = copy.deepcopy(model.config)
    config.text_config._attn_implementation = "vllm-shaped"  # what vLLM's Transformers backend does
    served = AutoModel.from_config(config).eval()
    served.load_state_dict(model.state_dict())
    batch = processor(text=["何色？"], images=[RED])
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        got = served(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).last_hidden_state
    torch.testing.assert_close(got, expected)
