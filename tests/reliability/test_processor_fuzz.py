"""Item 5: the processor under random input (hypothesis).

Documented errors: the processor and `load_image` raise `ValueError` and nothing else;
`ImageLoadError` (a ValueError, with a `reason` from `IMAGE_FAULTS`) for image files, whatever
PIL's decoders raised underneath (UnidentifiedImageError, DecompressionBombError, OSError,
SyntaxError, struct.error, ...). The trainer's `encode_record` never raises: it returns a
drop reason. Whatever is kept supervises exactly the answers, each followed by one end token.
"""

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_jp.presets.builder import build
from llava_jp.core.processing import IMAGE_FAULTS, ImageLoadError, load_image
from llava_jp.core.templates import CONVERSATION_FAULTS, normalize_conversation
from llava_jp.train.data import LENGTH_FAULTS, encode_record

from tests.helpers import supervised_runs
from tests.reliability.conftest import SOAK, scaled

EOS = "<EOD|LLM-jp>"
SPECIAL_TEXT = ["<image>", EOS, "<pad>", "<s>", "", " ", "\n", "ユーザー: ", " システム: ", "\ud800", "\x00", "🍣"]
ROLES = ["human", "gpt", "ユーザー", "システム", "user", "assistant", "robot", "", None, 3]


@pytest.fixture(scope="module")
def processor():
    return build("tiny", pretrained=False)[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _fuzz_settings(ci: int, soak: int):
    return settings(max_examples=scaled(ci, soak), deadline=None, derandomize=not SOAK, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TEXT)), max_size=4).map("".join)
clean_text = st.lists(st.one_of(st.text(max_size=24), st.sampled_from(SPECIAL_TEXT[1:])), min_size=1, max_size=5).map(
    "".join).filter(lambda t: t.strip() and "<image>" not in t and "\ud800" not in t)
turn = st.one_of(
    st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": text}),
    st.fixed_dictionaries({"from": st.sampled_from(ROLES[:6]), "value": st.one_of(st.none(), st.integers())}),
    st.just("not a turn"),
)


@st.composite
def well_formed(draw, image: bool):
    """A conversation the trainer should keep (unless too long): one marker per image."""
    pairs = draw(st.lists(st.tuples(clean_text, clean_text), min_size=1, max_size=4))
    roles = draw(st.sampled_from([("human", "gpt"), ("ユーザー", "システム"), ("user", "assistant")]))
    raw = [t for q, a in pairs for t in ({"from": roles[0], "value": q}, {"from": roles[1], "value": a})]
    if image:
        raw[0]["value"] = draw(st.sampled_from(["<image>\n{}", "{}\n<image>", "{}<image>{}"])).replace("{}", raw[0]["value"])
    if draw(st.booleans()):
        raw.append({"from": roles[0], "value": draw(clean_text)})  # a trailing question: dropped
    return raw


@st.composite
def records(draw):
    """(LLaVA-format turns, image path or None): two thirds well formed, one third anything."""
    image = draw(st.sampled_from([None, "a.png"]))
    if draw(st.integers(0, 2)):
        return draw(well_formed(image is not None)), image
    return draw(st.one_of(st.lists(turn, max_size=6), st.none(), st.just({"from": "human"}))), image


conversations = records().map(lambda r: r[0])


def test_random_records_are_kept_with_exact_answers_or_dropped_with_a_reason(processor, checked):
    outcomes = Counter()
    eos = processor.tokenizer.eos_token_id

    @_fuzz_settings(300, 20_000)
    @given(record=records(), max_length=st.integers(24, 400))
    def check(record, max_length):
        raw, image = record
        out = encode_record({"id": "x", "image": image, "conversations": json.dumps(raw)}, processor, max_length, plain=False)
        outcomes[out["status"]] += 1
        if out["status"] not in ("ok", "truncated"):
            assert out["status"] in CONVERSATION_FAULTS + LENGTH_FAULTS and "'x'" in out["error"]
            return
        messages = normalize_conversation(raw)
        if messages[-1]["role"] == "user":
            messages = messages[:-1]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        ids, labels = out["input_ids"], out["labels"]
        runs = supervised_runs(ids, labels)
        assert len(ids) == out["length"] <= max_length
        assert 1 <= len(runs) <= len(answers) and (len(runs) == len(answers)) == (out["status"] == "ok")
        assert [processor.tokenizer.decode(r, clean_up_tokenization_spaces=False) for r in runs] == \
            [a + EOS for a in answers[:len(runs)]]
        assert labels.count(eos) == ids.count(eos) == len(runs)  # an end token typed in the text stays text
        assert ids.count(processor.image_token_id) == processor.num_image_tokens * (image is not None)

    check()
    assert outcomes["ok"] and outcomes["truncated"] and len(outcomes) >= 6, outcomes
    checked("random records by outcome", dict(outcomes))


def _seed_images() -> dict[str, bytes]:
    """Small valid files in many formats and modes, for mutating."""
    rgb = Image.fromarray(np.arange(8 * 6 * 3, dtype=np.uint8).reshape(6, 8, 3))
    palette = rgb.convert("P")
    palette.info["transparency"] = 3
    out = {}
    for name, image, fmt in [
        ("png", rgb, "PNG"), ("png16", Image.fromarray(np.full((6, 8), 40000, dtype=np.uint16)), "PNG"),
        ("palette_alpha", palette, "PNG"), ("rgba", rgb.convert("RGBA"), "PNG"), ("jpeg", rgb, "JPEG"),
        ("cmyk_jpeg", rgb.convert("CMYK"), "JPEG"), ("gif", palette, "GIF"), ("bmp", rgb, "BMP"),
        ("tiff16be", Image.fromarray(np.full((6, 8), 40000, dtype=">u2")), "TIFF"), ("tiff", rgb, "TIFF"),
        ("webp", rgb, "WEBP"), ("ico", rgb, "ICO"), ("tga", rgb, "TGA"), ("ppm", rgb, "PPM"),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        out[name] = buffer.getvalue()
    return out


SEEDS = _seed_images()


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from([*SEEDS, "random"]))
    if kind == "random":
        return kind, draw(st.binary(max_size=512))
    data = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            data[pos:pos + 4] = draw(st.binary(min_size=4, max_size=4))
    return kind, bytes(data)


def test_random_image_bytes_load_as_rgb_or_raise_image_load_error(processor, workdir, checked):
    outcomes = Counter()
    path = workdir / "image"

    @_fuzz_settings(250, 20_000)
    @given(sample=image_bytes())
    def check(sample):
        path.write_bytes(sample[1])
        try:
            image = load_image(path)
        except ImageLoadError as err:
            assert err.reason in IMAGE_FAULTS and str(path) in str(err)
            outcomes[err.reason] += 1
            return
        assert image.mode == "RGB" and min(image.size) >= 1
        pixels = processor.preprocess_images([image])
        assert pixels.shape[0] == 1 and torch.isfinite(pixels).all()
        outcomes["loaded"] += 1

    check()
    assert outcomes["loaded"] and outcomes["corrupt_image"] and outcomes["not_an_image"], outcomes
    checked("random or mutated image files by outcome", dict(outcomes))


def test_the_processor_raises_only_value_errors(processor, workdir, checked):
    outcomes = Counter()
    image_file = workdir / "maybe_image"

    @_fuzz_settings(250, 20_000)
    @given(raw=conversations, images=st.lists(st.one_of(st.none(), st.just("file"), st.just("pil")), max_size=2),
           data=image_bytes(), generation=st.booleans())
    def check(raw, images, data, generation):
        image_file.write_bytes(data[1])
        images = [None if i is None else image_file if i == "file" else Image.new("RGB", (5, 9)) for i in images]
        try:
            messages = normalize_conversation(raw)
            batch = processor(conversations=messages, images=images or None, add_generation_prompt=generation)
        except ValueError as err:
            outcomes[type(err).__name__] += 1
            return
        n_images = sum(m["content"].count("<image>") for m in messages if m["role"] == "user")
        assert batch["input_ids"].shape[0] == 1 and ("labels" in batch) == (not generation)
        assert int((batch["input_ids"] == processor.image_token_id).sum()) == n_images * processor.num_image_tokens
        assert ("pixel_values" in batch) == (n_images > 0)
        outcomes["batch"] += 1

    check()
    assert outcomes["batch"] and outcomes["ValueError"] and outcomes["ImageLoadError"], outcomes
    checked("random processor calls by outcome", dict(outcomes))
