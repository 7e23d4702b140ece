"""Nothing we do passes an argument transformers (or torch) deprecates: the model's forward,
training step, generation and the processor's idioms raise no DeprecationWarning/FutureWarning.
(transformers 5.24 deprecates `past_key_values` in favour of `cache`; earlier 5.x know only the
old name: the model passes on whichever name generation gave it.)"""

import logging
import warnings

import torch
import transformers
from PIL import Image

from llava_jp.presets.builder import build

RED = Image.new("RGB", (50, 40), (255, 0, 0))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_forward_training_step_and_generation_raise_no_deprecation_warning():
    # transformers also deprecates through its logger, once per process (`warning_once`): forget
    # what earlier tests triggered, and listen
    transformers.utils.logging.warning_once.cache_clear()
    logged = _Records()
    logging.getLogger("transformers").addHandler(logged)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(0)
            model, processor = build("tiny", pretrained=False)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "何色？"}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = processor(images=RED, text=prompt, return_tensors="pt")
            train = processor(conversations=[{"role": "user", "content": "<image>\n何色？"},
                                             {"role": "assistant", "content": "赤"}], images=[RED])
            model.train()
            model(**train, supervised_only=True, loss_reduction="sum").loss.backward()
            model(**train).loss.backward()
            model(**train, use_cache=False, supervised_only=True).loss.backward()  # the trainer's forward
            model.eval()
            with torch.no_grad():
                model(**inputs, use_cache=True)
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            processor.batch_decode(out, skip_special_tokens=True)
            model.generate(**processor(text=["何色？", "こんにちは"], images=[RED, None]), max_new_tokens=3, do_sample=True)
    finally:
        logging.getLogger("transformers").removeHandler(logged)
    found = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
             if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    found += [m for m in logged.messages if "deprecat" in m.lower()]
    assert found == []


def test_forward_with_return_dict_false_gives_a_tuple():
    """The LM's tuple output (what `return_dict=False` and vLLM's Transformers backend get) has no
    named cache to look up: the forward still runs."""
    torch.manual_seed(0)
    model, processor = build("tiny", pretrained=False)
    batch = processor(text=["何色？"], images=[RED])
    with torch.no_grad():
        out = model(**batch, return_dict=False, use_cache=False)
        want = model(**batch, use_cache=False).logits
    torch.testing.assert_close(out[0], want, rtol=0, atol=0)
