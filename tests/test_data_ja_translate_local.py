"""`data_ja translate --backend transformers` with tiny random models built here (no download).

Their output is garbage: the point is that it runs end to end and that garbage is rejected and
reported, never written as a translation."""

import json
import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, T5Config,
                          T5ForConditionalGeneration)

from data_ja.backends import SINGLE_PROMPT, TransformersBackend
from data_ja.cli import main

# ASCII only (unlike llava_jp.presets.tokenizers's): whatever a random model emits is then not Japanese.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOS]"]
CHARACTERS = sorted(set(string.printable + "⟦⟧"))
VOCAB = len(SPECIAL_TOKENS) + len(CHARACTERS)
ENGLISH = [
    {"id": "a", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the table?"},
        {"from": "gpt", "value": "A cup of tea."}]},
    {"id": "b", "conversations": [
        {"from": "human", "value": "Name 2 fruits."},
        {"from": "gpt", "value": "Apples and pears."}]},
]
GARBAGE_REASONS = {"empty", "not Japanese", "placeholders changed", "line breaks changed",
                   "numbers lost", "implausible length"}


def _save_ascii_tokenizer(directory):
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="[EOS]").save_pretrained(directory)


def _build(kind, directory):
    torch.manual_seed(0)
    _save_ascii_tokenizer(directory)
    if kind == "causal":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=16,
                                           n_layer=1, n_head=2, bos_token_id=2, eos_token_id=2))
    else:
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
            pad_token_id=0, eos_token_id=2, decoder_start_token_id=0))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["causal", "seq2seq"])
def tiny_model(request, tmp_path_factory):
    return request.param, _build(request.param, tmp_path_factory.mktemp(request.param))


def test_backend_returns_only_the_generated_text(tiny_model):
    kind, path = tiny_model
    backend = TransformersBackend(str(path), max_new_tokens=6, device="cpu")
    assert backend.seq2seq == (kind == "seq2seq")
    outputs = backend.translate(["A dog.", "Two cats sleep on the sofa."], attempt=0)
    assert len(outputs) == 2
    for out in outputs:
        assert isinstance(out, str) and len(out) <= 6  # one character per token
        assert SINGLE_PROMPT[:20] not in out


def test_garbage_translations_are_rejected_and_reported_not_written(tiny_model, tmp_path):
    _, path = tiny_model
    src = tmp_path / "en.json"
    src.write_text(json.dumps(ENGLISH), encoding="utf-8")
    out = tmp_path / "ja.json"
    status = main(["translate", str(src), "--out", str(out), "--backend", "transformers",
                   "--model", str(path), "--device", "cpu", "--max-new-tokens", "8",
                   "--batch-size", "3", "--retries", "1", "--retry-wait", "0"])
    assert status == 1
    assert json.loads(out.read_text(encoding="utf-8")) == []
    failed = json.loads((tmp_path / "ja.json.failed.json").read_text(encoding="utf-8"))
    assert failed["samples_failed"] == 2 and failed["texts_failed"] == 4
    assert {item["id"] for item in failed["items"]} == {"a", "b"}
    assert {item["reason"] for item in failed["items"]} <= GARBAGE_REASONS
    assert (tmp_path / "ja.json.cache.jsonl").read_text(encoding="utf-8") == ""
