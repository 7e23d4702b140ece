import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import Template as Jinja

from llava_jp.presets.builder import build_config, build_processor, load_preset
from llava_jp.core.processing import LlavaJpProcessor
from llava_jp.core.templates import LLM_JP_V1_SYSTEM, get_template, normalize_conversation
from llava_jp.presets.tokenizers import build_char_tokenizer

from tests.helpers import byte_bpe_tokenizer
from tests.helpers import supervised_runs as _supervised_runs

EOS = "<EOD|LLM-jp>"


def test_llm_jp_v1_renders_exactly_as_the_recipe():
    messages = [
        {"role": "user", "content": "<image>\n何色ですか？"},
        {"role": "assistant", "content": "赤です。"},
        {"role": "user", "content": "形は？"},
        {"role": "assistant", "content": "丸です。"},
    ]
    text = get_template("llm-jp-v1").render(messages, EOS)
    assert text == (
        f"{LLM_JP_V1_SYSTEM} ユーザー: <image>\n何色ですか？ システム: 赤です。{EOS}"
        f" ユーザー: 形は？ システム: 丸です。{EOS}"
    )


def test_plain_renders_image_then_caption():
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "犬の写真\n"}]
    assert get_template("plain").render(messages, EOS) == "<image>犬の写真\n"


def test_generation_prompt_ends_with_assistant_prefix():
    text = get_template("llm-jp-v1").render([{"role": "user", "content": "やあ"}], EOS, add_generation_prompt=True)
    assert text.endswith("ユーザー: やあ システム: ")


@pytest.mark.parametrize("name", ["llm-jp-v1", "plain"])
def test_jinja_chat_template_matches_render(name):
    template = get_template(name)
    messages = [
        {"role": "user", "content": "<image>\nこれは'何'？"},
        {"role": "assistant", "content": "りんご"},
        {"role": "user", "content": "色は"},
        {"role": "assistant", "content": "赤"},
    ]
    rendered = Jinja(template.jinja()).render(messages=messages, eos_token=EOS)
    assert rendered == template.render(messages, EOS)


def test_normalize_conversation_both_role_spellings():
    raw = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
           {"from": "ユーザー", "value": "c"}, {"from": "システム", "value": "d"}]
    assert [m["role"] for m in normalize_conversation(raw)] == ["user", "assistant", "user", "assistant"]


def test_normalize_conversation_names_bad_turn():
    with pytest.raises(ValueError, match=r"sample 'x7'.*turn 1.*'bot'"):
        normalize_conversation([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], sample_id="x7")


def test_roles_must_alternate():
    with pytest.raises(ValueError, match="turn 1"):
        get_template("llm-jp-v1").segments([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def _processor(tokenizer, template):
    preset = load_preset("tiny")
    preset.template = template
    config = build_config(preset, tokenizer=tokenizer)
    return build_processor(preset, config, tokenizer, num_image_tokens=4)


TOKENIZERS = {"char": build_char_tokenizer(), "bpe": byte_bpe_tokenizer(), "bpe+bos": byte_bpe_tokenizer(bos=True)}
_ALPHABET = "あいうえおかきくけこアイウ赤青丸四角数字 、。！？\nabcXYZ0123:"
text = st.text(alphabet=_ALPHABET, min_size=1, max_size=20)


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 3))
    messages = []
    for i in range(turns):
        question = draw(text)
        if i == 0 and draw(st.booleans()):
            question = "<image>\n" + question if draw(st.booleans()) else question + "\n<image>"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": draw(text)}]
    return messages


@pytest.mark.parametrize("tok_name", list(TOKENIZERS))
@pytest.mark.parametrize("template", ["llm-jp-v1", "plain"])
@settings(max_examples=60, deadline=None)
@given(messages=conversations())
def test_supervised_tokens_decode_exactly_to_answers(tok_name, template, messages):
    tokenizer = TOKENIZERS[tok_name]
    processor = _processor(tokenizer, template)
    encoded = processor.encode_conversation(messages)
    runs = _supervised_runs(encoded["input_ids"], encoded["labels"])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    end = EOS if template == "llm-jp-v1" else ""
    decoded = [tokenizer.decode(r, clean_up_tokenization_spaces=False) for r in runs]
    # answers may be adjacent in "plain" (no context between them): compare the concatenation
    assert "".join(decoded) == "".join(a + end for a in answers)
    if template == "llm-jp-v1":
        assert decoded == [a + EOS for a in answers]
    # the whole sequence (images as markers) decodes to the rendered template text
    n_img = processor.num_image_tokens
    text_ids, pieces = [], []
    ids = encoded["input_ids"]
    i = 0
    while i < len(ids):
        if ids[i] == processor.image_token_id:
            pieces.append(tokenizer.decode(text_ids, clean_up_tokenization_spaces=False) + "<image>")
            text_ids, i = [], i + n_img
        else:
            text_ids.append(ids[i])
            i += 1
    pieces.append(tokenizer.decode(text_ids, clean_up_tokenization_spaces=False))
    bos = "<s>" if tok_name == "bpe+bos" else ""
    assert "".join(pieces) == bos + get_template(template).render(messages, EOS)


def test_bos_prefix_detected_once():
    processor = _processor(TOKENIZERS["bpe+bos"], "llm-jp-v1")
    ids = processor.encode_conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])["input_ids"]
    bos = TOKENIZERS["bpe+bos"].bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1


def test_image_markers_must_match_images():
    processor = _processor(TOKENIZERS["char"], "llm-jp-v1")
    with pytest.raises(ValueError, match="1 <image> markers but 0 images"):
        processor(conversations=[{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}])


def test_processor_round_trips_through_save(tmp_path):
    processor = _processor(TOKENIZERS["bpe"], "plain")
    processor.save_pretrained(tmp_path)
    loaded = LlavaJpProcessor.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "赤い丸\n"}]
    assert loaded.template == "plain" and loaded.num_image_tokens == 4
    assert loaded.encode_conversation(messages) == processor.encode_conversation(messages)
    assert loaded.chat_template == processor.chat_template


@st.composite
def chat_messages(draw):
    """Conversations as transformers users write them: string or list content, images anywhere
    in user turns, with or without a final user turn waiting for the answer."""
    messages = []
    for i in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            items = draw(st.lists(st.one_of(st.just({"type": "image"}), text.map(lambda t: {"type": "text", "text": t})),
                                  min_size=1, max_size=3))
            messages.append({"role": "user", "content": items})
        else:
            messages.append({"role": "user", "content": draw(text)})
        answer = draw(text)
        messages.append({"role": "assistant",
                         "content": [{"type": "text", "text": answer}] if draw(st.booleans()) else answer})
    if draw(st.booleans()):
        return messages[:-1], True
    return messages, False


@pytest.mark.parametrize("template", ["llm-jp-v1", "plain"])
@settings(max_examples=80, deadline=None)
@given(case=chat_messages())
def test_chat_template_renders_what_training_renders(template, case):
    """The hub's `apply_chat_template` (Jinja, transformers' renderer) and the training renderer
    (`Template.render`, whose segments the labels come from) give the same text."""
    messages, generation = case
    processor = _processor(TOKENIZERS["char"], template)
    chat = processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
    assert chat == get_template(template).render(normalize_conversation(messages), EOS, add_generation_prompt=generation)
    if get_template(template).prompt_prefix:  # and a rendered prompt parses back to the same conversation
        parsed, ends_with_prompt = get_template(template).parse(chat, EOS)
        assert ends_with_prompt == generation and parsed == normalize_conversation(messages)
