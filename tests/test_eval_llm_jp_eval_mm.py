"""The llm-jp-eval-mm adapter: the harness's call shapes reach our batched answer function."""

from dataclasses import dataclass

import pytest

from llava_jp.eval.llm_jp_eval_mm import VLM, generation_kwargs, get_class_from_model_id
from tests.fakes.eval_data import tiny_image


@dataclass
class GenerationConfig:  # the harness's fields (scripts/eval_mm_harness.py); max_new_tokens 256 here, as these tests assert
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    do_sample: bool = False
    use_cache: bool = True


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, images, questions, **kwargs):
        self.calls.append((images, questions, kwargs))
        return [f"{q}:{i.getpixel((0, 0)) if i else None}" for i, q in zip(images, questions)]


def test_generate_answers_one_image_greedy():
    recorder = Recorder()
    vlm = VLM("some/model", answer_fn=recorder)
    answer = vlm.generate([tiny_image("red").convert("L")], "<image>\n何色？", GenerationConfig())
    assert answer == "何色？:(76, 76, 76)"  # a grey-scale "L" pixel would be one int: now RGB
    _, questions, kwargs = recorder.calls[0]
    assert questions == ["何色？"]
    assert kwargs == {"max_new_tokens": 256, "num_beams": 1, "do_sample": False, "use_cache": True}


def test_batch_generate_is_one_batched_call():
    recorder = Recorder()
    vlm = VLM("m", answer_fn=recorder)
    answers = vlm.batch_generate(
        [[tiny_image("red")], [tiny_image("blue")]], ["a", "b"], GenerationConfig(max_new_tokens=8)
    )
    assert answers == ["a:(255, 0, 0)", "b:(0, 0, 255)"]
    assert len(recorder.calls) == 1 and recorder.calls[0][2]["max_new_tokens"] == 8


def test_sampling_passes_temperature_and_defaults_without_config():
    assert generation_kwargs(GenerationConfig(do_sample=True, temperature=0.7))["temperature"] == 0.7
    assert generation_kwargs() == {"max_new_tokens": 256}
    assert generation_kwargs({"max_new_tokens": 5, "temperature": 0.0}) == {"max_new_tokens": 5}


@pytest.mark.parametrize("images", [[], None])
def test_no_image_is_a_text_only_question(images):
    recorder = Recorder()
    assert VLM("m", answer_fn=recorder).generate(images, "q") == "q:None"
    assert recorder.calls[0][0] == [None]


def test_several_images_are_shown_side_by_side():
    recorder = Recorder()
    VLM("m", answer_fn=recorder).generate([tiny_image("red"), tiny_image("blue", size=8)], "q")
    (image,) = recorder.calls[0][0]
    assert image.size == (32, 16)  # the 8 px image scaled to the common height
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((31, 15)) == (0, 0, 255)


def test_serve_answers_json_lines(tmp_path, monkeypatch):
    import io
    import json

    from llava_jp.eval import llm_jp_eval_mm

    tiny_image("red").save(tmp_path / "r.png")
    requests = io.StringIO(
        json.dumps({"images": [str(tmp_path / "r.png")], "text": "<image>何色？", "gen_kwargs": {"max_new_tokens": 3}})
        + "\n" + json.dumps({"images": [str(tmp_path / "missing.png")], "text": "q"}) + "\n"
    )
    replies = io.StringIO()
    recorder = Recorder()
    monkeypatch.setattr(llm_jp_eval_mm.VLM, "_load", staticmethod(lambda model_id, device: recorder))
    llm_jp_eval_mm.serve("m", requests, replies)
    lines = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert lines[0] == {"ready": "m"}
    assert lines[1] == {"text": "何色？:(255, 0, 0)"} and recorder.calls[0][2] == {"max_new_tokens": 3}
    assert "missing.png" in lines[2]["error"]


def test_real_tiny_model_through_the_adapter(tiny_dir):
    from llava_jp.eval.runner import load_model
    from llava_jp.infer.generate import generate_answers

    vlm = VLM(str(tiny_dir), device="cpu")
    image = tiny_image("red")
    answers = vlm.batch_generate([[image], None], ["何色ですか？", "こんにちは"], GenerationConfig(max_new_tokens=6))
    model, processor = load_model(str(tiny_dir), "cpu")
    expected = generate_answers(model, processor, [image, None], ["何色ですか？", "こんにちは"], max_new_tokens=6)
    assert answers == expected and all(isinstance(a, str) for a in answers)


def test_model_table_hook_returns_the_adapter():
    assert get_class_from_model_id("/any/path") is VLM
