"""`<image>` is a tokenizer token; models and processors saved before (placeholder -200) load converted."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, SiglipVisionModel

from llava_jp import LlavaJpForConditionalGeneration, LlavaJpProcessor
from llava_jp.presets.builder import build

RED = Image.new("RGB", (50, 40), (255, 0, 0))
# the chat template earlier versions saved (string content only, no `<image>` handling)
OLD_CHAT_TEMPLATE = (
    "{{ 'これは好奇心旺盛なユーザーと人工知能システムのチャットです。システムはユーザーの質問に親切、詳細、丁寧に答える。 ' }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% if not loop.first %}{{ ' ' }}{% endif %}"
    "{{ 'ユーザー: ' + m['content'] + ' システム: ' }}{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def write_legacy_folder(path, spare_row: bool) -> LlavaJpForConditionalGeneration:
    """A tiny model saved in the layout llava-jp wrote before `<image>` was a token: config.json
    and processor_config.json hold image_token_id -200, the tokenizer has no `<image>`, the
    vision tower carries SigLIP's pooling head, the chat template takes string content only.
    `spare_row`: the LM's embedding has a row beyond the tokenizer (as llm-jp-1.3b does), else
    exactly one row per token. Returns the model as it was saved (the reference)."""
    torch.manual_seed(0)
    model, processor = build("tiny", pretrained=False)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    image_id = processor.image_token_id
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<image>"]
    (path / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config.get("added_tokens_decoder", {}).pop(str(image_id), None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False))
    proc_config = json.loads((path / "processor_config.json").read_text())
    (path / "processor_config.json").write_text(json.dumps(proc_config | {"image_token_id": -200}))
    (path / "chat_template.jinja").write_text(OLD_CHAT_TEMPLATE)
    config = json.loads((path / "config.json").read_text())
    config["image_token_id"] = -200
    config["vision_config"]["vision_use_head"] = True
    state = load_file(path / "model.safetensors")
    head_config = model.vision_tower.config.__class__(**{**model.vision_tower.config.to_dict(), "vision_use_head": True})
    state |= {f"vision_tower.{k}": v for k, v in SiglipVisionModel(head_config).state_dict().items() if k.startswith("head.")}
    if not spare_row:  # one row per token of the old tokenizer: `<image>` was its last row here
        for key in ("language_model.transformer.wte.weight", "language_model.lm_head.weight"):
            state[key] = state[key][:image_id].clone()
        config["text_config"]["vocab_size"] = image_id
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("spare_row", [True, False])
def test_a_model_saved_with_the_old_placeholder_loads_converted(tmp_path, spare_row):
    reference = write_legacy_folder(tmp_path, spare_row).eval()
    assert json.loads((tmp_path / "config.json").read_text())["image_token_id"] == -200
    processor = LlavaJpProcessor.from_pretrained(tmp_path)
    model = LlavaJpForConditionalGeneration.from_pretrained(tmp_path).eval()
    old_vocab = len(processor.tokenizer) - 1
    # `<image>` takes the next free id, the same one in the processor and the model
    assert processor.image_token_id == model.config.image_token_id == old_vocab
    assert processor.tokenizer.convert_ids_to_tokens(old_vocab) == "<image>"
    rows = model.get_input_embeddings().num_embeddings
    assert rows == old_vocab + 1  # the spare row, or one grown row
    # never generated: a -inf bias built once (bad_words_ids), and the old per-token suppress list is gone
    assert model.generation_config.bad_words_ids == [[old_vocab]] and not model.generation_config.suppress_tokens
    assert "vision_tower.head.probe" not in model.state_dict()
    # the conversion changes nothing the old model computed: same logits over the old vocabulary
    batch = processor(text=["何色？"], images=[RED])
    assert int((batch["input_ids"] == old_vocab).sum()) == processor.num_image_tokens
    with torch.no_grad():
        got = model(**batch).logits[..., :old_vocab]
        want = reference(**batch).logits[..., :old_vocab]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # list-content messages work with the regenerated chat template
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "何色？"}]}], add_generation_prompt=True)
    assert torch.equal(processor(text=prompt, images=RED)["input_ids"], batch["input_ids"])
    # saved again, the folder is in the new layout
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["image_token_id"] == old_vocab
    assert "image_token_id" not in json.loads((tmp_path / "again" / "processor_config.json").read_text())
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "again").config.image_token_id == old_vocab
    assert AutoProcessor.from_pretrained(tmp_path / "again").image_token_id == old_vocab


def test_a_model_without_its_image_token_names_the_fix(tiny):
    model, processor = tiny
    model.config.image_token_id = -200
    try:
        with pytest.raises(ValueError, match=r"set_image_token\(processor.image_token_id\)"):
            model(**processor(text=["何色？"], images=[RED]))
    finally:
        model.set_image_token(processor.image_token_id)


class _Boost:
    """A logits processor that adds a large score to one token (runs after the model's own)."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] += 1e4
        return scores


def test_generation_never_emits_the_image_token_even_from_a_saved_release(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image_id = processor.image_token_id
    batch = processor(text=["何色？"], images=[RED])
    prompt = batch["input_ids"].shape[1]
    for loaded in (model, LlavaJpForConditionalGeneration.from_pretrained(tmp_path).eval()):
        out = loaded.generate(**batch, max_new_tokens=4, do_sample=False, logits_processor=[_Boost(image_id)])
        assert image_id not in out[0, prompt:].tolist()
    # the check can fail: without the model's own ban the boosted token wins (and, fed back, would
    # break the next step: a placeholder without an image)
    loaded.generation_config.bad_words_ids = None
    out = loaded.generate(**batch, max_new_tokens=1, do_sample=False, logits_processor=[_Boost(image_id)])
    assert out[0, prompt:].tolist() == [image_id]


def test_typed_image_marker_stays_text(tiny):
    """A user typing `<image>` into a question without an image cannot forge an image slot."""
    _, processor = tiny
    batch = processor(conversations=[{"role": "user", "content": "<image>"}], add_generation_prompt=True, images=[RED])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == processor.num_image_tokens
    ids = processor.tokenizer("<image>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert processor.image_token_id not in ids


def test_processor_returns_a_batchfeature_that_moves(tiny):
    _, processor = tiny
    batch = processor(text=["何色？", "こんにちは"], images=[RED, None])
    assert type(batch).__name__ == "BatchFeature"
    moved = batch.to("cpu")
    assert set(moved) == {"input_ids", "attention_mask", "pixel_values"} and moved["pixel_values"].shape[0] == 1
    lists = processor(text=["何色？"], images=[RED], return_tensors=None)
    assert isinstance(lists["input_ids"], list) and lists["input_ids"] == batch["input_ids"][:1, -len(lists["input_ids"][0]):].tolist()


def test_a_rendered_prompt_is_never_wrapped_again(tiny):
    _, processor = tiny
    question = "何色？"
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                                           add_generation_prompt=True, tokenize=False)
    from_prompt = processor(text=prompt, images=RED)["input_ids"]
    from_question = processor(text=question, images=RED)["input_ids"]
    assert torch.equal(from_prompt, from_question)
    text = processor.decode(from_prompt[0], skip_special_tokens=True)
    assert text.count("ユーザー:") == 1 and text.count("これは好奇心旺盛な") == 1


def test_a_rendered_multi_turn_conversation_gives_the_training_labels(tiny):
    _, processor = tiny
    messages = [{"role": "user", "content": "<image>\n何色？"}, {"role": "assistant", "content": "赤"},
                {"role": "user", "content": "形は？"}, {"role": "assistant", "content": "丸"}]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    from_text = processor(text=rendered, images=RED)
    from_messages = processor(conversations=messages, images=[RED])
    assert torch.equal(from_text["input_ids"], from_messages["input_ids"])
    assert torch.equal(from_text["labels"], from_messages["labels"])


def test_a_prompt_that_looks_rendered_but_is_not_is_refused(tiny):
    _, processor = tiny
    prompt = processor.apply_chat_template([{"role": "user", "content": "何色？"}], add_generation_prompt=True)
    with pytest.raises(ValueError, match="does not follow the template"):
        processor(text=prompt.replace(" システム: ", " "))


def test_apply_chat_template_tokenize_true_gives_pixel_values(tiny, tmp_path):
    model, processor = tiny
    RED.save(tmp_path / "red.png")
    expected = processor(text=["何色？"], images=[RED])
    for item in ({"image": RED}, {"path": str(tmp_path / "red.png")}):
        messages = [{"role": "user", "content": [{"type": "image", **item}, {"type": "text", "text": "何色？"}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        assert torch.equal(inputs["input_ids"], expected["input_ids"])
        torch.testing.assert_close(inputs["pixel_values"], expected["pixel_values"])
    # string content, no image
    text_only = processor.apply_chat_template([{"role": "user", "content": "こんにちは"}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)
    assert torch.equal(text_only["input_ids"], processor(text=["こんにちは"])["input_ids"])


def test_batch_decode_works_on_any_output(tiny):
    model, processor = tiny
    batch = processor(text=["何色？", "こんにちは"], images=[RED, None])
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    whole = processor.batch_decode(out, skip_special_tokens=True)
    new = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(w.endswith(n) for w, n in zip(whole, new))
    assert "<image>" in processor.batch_decode(batch["input_ids"])[0]


def test_what_vllm_asks_the_processor(tiny):
    _, processor = tiny
    counts = processor._get_num_multimodal_tokens(image_sizes=[[40, 50], [1000, 30]])
    assert counts.num_image_tokens == [processor.num_image_tokens] * 2 and counts.num_image_patches == [1, 1]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "何色？"}]}],
                                           add_generation_prompt=True)
    out = processor(text=prompt, images=RED, return_mm_token_type_ids=True, return_text_replacement_offsets=True)
    assert torch.equal(out["mm_token_type_ids"], (out["input_ids"] == processor.image_token_id).long())
    (offset,) = out["text_replacement_offsets"][0]
    start, end = offset["span"]
    assert prompt[start:end] == "<image>" and offset["replacement"] == "<image>" * processor.num_image_tokens
    expanded = prompt[:start] + offset["replacement"] + prompt[end:]
    new_start, new_end = offset["new_span"]
    assert expanded[new_start:new_end] == offset["replacement"]
    # vLLM tokenizes the replacement text: one image id per image token
    ids = processor.tokenizer(offset["replacement"], add_special_tokens=False)["input_ids"]
    assert ids == [processor.image_token_id] * processor.num_image_tokens


def test_vllm_call_with_truncation_false_is_accepted_and_truncation_refused(tiny):
    _, processor = tiny
    # vLLM's Transformers backend calls the processor with truncation=False (seen in its 400 error)
    out = processor(text="<image>", images=[RED], truncation=False, return_tensors="pt")
    assert int((out["input_ids"] == processor.image_token_id).sum()) == processor.num_image_tokens
    with pytest.raises(ValueError, match="does not truncate"):
        processor(text="<image>", images=[RED], truncation=True)


def test_get_image_features_with_return_dict_gives_pooler_output(tiny):
    model, processor = tiny
    pixels = processor(text="<image>", images=[RED], return_tensors="pt")["pixel_values"]
    plain = model.get_image_features(pixels)
    # vLLM's Transformers backend: get_image_features(pixel_values, return_dict=True).pooler_output
    assert torch.equal(model.get_image_features(pixels, return_dict=True).pooler_output, plain)
