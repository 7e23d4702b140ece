"""`llava_jp.infer.chat`: the Python chat API both front ends use."""

import pytest
import torch

from llava_jp.presets.tokenizers import build_char_tokenizer
from PIL import Image

from llava_jp.infer.chat import (
    ChatError,
    ChatSession,
    GenerationSettings,
    JapaneseTextStreamer,
    load_chat_image,
    load_model,
    resolve_model,
)
from llava_jp.infer.generate import generate_answers

RED = Image.new("RGB", (64, 48), (255, 0, 0))
BLUE = Image.new("RGB", (40, 40), (0, 0, 255))
SHORT = GenerationSettings(max_new_tokens=12)


def _greedy(model, processor, conversation, image, max_new_tokens=12):
    """The reference answer: the processor's prompt for `conversation`, decoded greedily."""
    batch = processor(conversations=conversation, images=[image] if image else None, add_generation_prompt=True)
    ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _spy_generate(monkeypatch, model) -> dict:
    """Record the keyword arguments of the model's next `generate` call."""
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def _count_lm_calls(model):
    calls = []
    model.language_model.transformer.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_one_shot_matches_batched_inference(tiny):
    model, processor = tiny
    answer = ChatSession(model, processor, image=RED).ask("何色ですか？", SHORT)
    assert answer and answer == generate_answers(model, processor, [RED], ["何色ですか？"], max_new_tokens=12)[0]


def test_multi_turn_keeps_the_image_in_the_first_user_turn(tiny):
    model, processor = tiny
    session = ChatSession(model, processor, image=RED)
    first = session.ask("何色ですか？", SHORT)
    second = session.ask("形は何ですか？", SHORT)
    assert session.messages == [
        {"role": "user", "content": "何色ですか？"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "形は何ですか？"}, {"role": "assistant", "content": second},
    ]
    conversation = [{"role": "user", "content": "<image>\n何色ですか？"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "形は何ですか？"}]
    assert second == _greedy(model, processor, conversation, RED)
    # the second answer depends on the history: asked alone, it is answered differently
    assert second != ChatSession(model, processor, image=RED).ask("形は何ですか？", SHORT)


def test_text_only_chat_and_image_marker_in_user_text(tiny):
    model, processor = tiny
    session = ChatSession(model, processor)
    answer = session.ask("こんにちは <image>", SHORT)
    assert session.messages[0]["content"] == "こんにちは"
    assert answer == _greedy(model, processor, [{"role": "user", "content": "こんにちは"}], None)


def test_answers_stream_piece_by_piece_while_generating(tiny):
    model, processor = tiny
    calls = _count_lm_calls(model)
    turn = ChatSession(model, processor, image=RED).send("何色ですか？", GenerationSettings(max_new_tokens=40))
    pieces, calls_at_piece = [], []
    for piece in turn:
        pieces.append(piece)
        calls_at_piece.append(len(calls))
    assert len(pieces) > 1 and "".join(pieces) == turn.text and turn.finished
    assert calls_at_piece[0] < len(calls)  # the first piece arrived before decoding ended


def test_kana_streams_character_by_character():
    tokenizer = build_char_tokenizer()  # one token per character: each must be released at once
    streamer = JapaneseTextStreamer(tokenizer, skip_prompt=False)
    for token in tokenizer("これはりんごです。apple pie", add_special_tokens=False)["input_ids"]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert list(streamer)[:9] == list("これはりんごです。")


def test_closing_the_stream_stops_generation_and_keeps_what_was_shown(tiny):
    model, processor = tiny
    model.generation_config.min_new_tokens = 200  # no early end token
    calls = _count_lm_calls(model)
    session = ChatSession(model, processor, image=RED)
    turn = session.send("何色ですか？", GenerationSettings(max_new_tokens=200))
    stream = iter(turn)
    shown = next(stream)
    stream.close()
    assert len(calls) < 50 and not turn.finished
    assert session.messages == [{"role": "user", "content": "何色ですか？"}, {"role": "assistant", "content": shown.strip()}]


def test_generation_errors_reach_the_reader_and_leave_history_alone(tiny, monkeypatch):
    model, processor = tiny
    session = ChatSession(model, processor, image=RED, messages=[{"role": "user", "content": "前"},
                                                                 {"role": "assistant", "content": "答"}])

    def broken(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.ask("何色？", SHORT)
    assert len(session.messages) == 2


def _long_history(n_pairs, length=40):
    history = []
    for i in range(n_pairs):
        history += [{"role": "user", "content": f"質問{i}" + "あ" * length},
                    {"role": "assistant", "content": f"答え{i}" + "い" * length}]
    return history


def test_long_conversations_drop_the_oldest_turns_with_a_notice(tiny, monkeypatch):
    model, processor = tiny
    seen = _spy_generate(monkeypatch, model)
    history = _long_history(8)
    session = ChatSession(model, processor, image=RED, messages=history)
    settings = GenerationSettings(max_new_tokens=150)
    turn = session.send("何色ですか？", settings)
    assert turn.dropped_turns > 0 and f"{turn.dropped_turns} 回分" in turn.notice
    kept = history[2 * turn.dropped_turns:]
    answer = "".join(turn)
    # the image moved to the first turn still in context, and prompt + answer fit 512 positions
    expected = [dict(kept[0], content="<image>\n" + kept[0]["content"]), *kept[1:], {"role": "user", "content": "何色ですか？"}]
    batch = processor(conversations=expected, images=[RED], add_generation_prompt=True)
    assert torch.equal(seen["input_ids"], batch["input_ids"]) and torch.equal(seen["pixel_values"], batch["pixel_values"])
    assert seen["input_ids"].shape[1] + 150 <= 512
    # no more was dropped than needed
    one_more = session.prompt_messages(history[2 * turn.dropped_turns - 2:], "何色ですか？")
    assert len(processor.encode_conversation(one_more, add_generation_prompt=True)["input_ids"]) + 150 > 512
    assert session.messages == kept + [{"role": "user", "content": "何色ですか？"}, {"role": "assistant", "content": answer}]
    assert ChatSession(model, processor, image=RED, messages=history[:2]).send("何色？", settings).notice is None


def test_a_question_too_long_for_the_context_is_refused(tiny):
    model, processor = tiny
    with pytest.raises(ChatError, match="質問が長すぎます"):
        ChatSession(model, processor, image=RED).send("あ" * 400, GenerationSettings(max_new_tokens=200))
    with pytest.raises(ChatError, match="質問を入力"):
        ChatSession(model, processor).send("  <image> ")


def test_new_image_starts_a_new_conversation_reset_keeps_the_image(tiny):
    model, processor = tiny
    session = ChatSession(model, processor, image=RED)
    session.ask("何色？", SHORT)
    session.reset()
    assert session.messages == [] and session.image is not None
    session.ask("何色？", SHORT)
    session.set_image(BLUE)
    assert session.messages == [] and session.image.size == (40, 40)
    assert session.ask("何色？", SHORT) == ChatSession(model, processor, image=BLUE).ask("何色？", SHORT)


def test_image_limits_and_invalid_files(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with pytest.raises(ChatError, match=r"画像が大きすぎます（300×200 = 60,000 画素）"):
        load_chat_image(big, max_pixels=50_000)
    assert load_chat_image(big, max_pixels=60_000).size == (300, 200)
    # PIL's decompression-bomb guard is still on underneath ours
    assert Image.MAX_IMAGE_PIXELS is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ChatError, match="画像が大きすぎます"):
        load_chat_image(big, max_pixels=10**9)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    text = tmp_path / "notes.txt"
    text.write_text("こんにちは", encoding="utf-8")
    for path in (broken, text, tmp_path / "missing.png"):
        with pytest.raises(ChatError, match="画像ファイルとして読み込めませんでした"):
            load_chat_image(path)


def test_generation_settings_ranges_and_kwargs():
    assert GenerationSettings().generate_kwargs() == {"max_new_tokens": 256, "do_sample": False}
    sampled = GenerationSettings(max_new_tokens=10, temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    assert sampled.generate_kwargs() == {"max_new_tokens": 10, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                         "repetition_penalty": 1.2}
    for field, value in [("temperature", -0.1), ("temperature", 2.5), ("top_p", 0.0), ("top_p", 1.5),
                         ("max_new_tokens", 0), ("repetition_penalty", 0.9), ("max_new_tokens", 2.5)]:
        with pytest.raises(ChatError, match=field):
            GenerationSettings(**{field: value})


def test_sampling_settings_reach_generate(tiny, monkeypatch):
    model, processor = tiny
    seen = _spy_generate(monkeypatch, model)
    torch.manual_seed(0)
    ChatSession(model, processor, image=RED).ask("何色？", GenerationSettings(5, 0.8, 0.5, 1.3))
    assert (seen["do_sample"], seen["temperature"], seen["top_p"]) == (True, 0.8, 0.5)
    # the penalty skips the prompt (generate sees the prompt ids): only the answer's tokens count
    (penalty,) = seen["logits_processor"]
    assert penalty.penalty == 1.3 and int(penalty.prompt_ignore_length) == seen["input_ids"].shape[1]


def test_default_model_is_the_quickstart_output(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ChatError, match="llava-jp quickstart") as info:
        resolve_model(None)
    assert "\n" not in str(info.value) and "quickstart_out/model" in str(info.value)
    (tmp_path / "quickstart_out").mkdir()
    (tmp_path / "quickstart_out" / "model").symlink_to(tiny_dir)
    model, processor = load_model(None, device="cpu")
    assert model.num_image_tokens == processor.num_image_tokens == 16
    with pytest.raises(ChatError, match="モデルを読み込めませんでした"):
        load_model(str(tmp_path / "no_such_model"), device="cpu")
