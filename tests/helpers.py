"""Tiny components built locally for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava_jp.core.templates import LLM_JP_V1_SYSTEM

JA_CORPUS = [
    LLM_JP_V1_SYSTEM,
    "画像には赤い丸と青い四角があります。左上に小さな数字が書かれています。",
    "ユーザー: この写真について説明してください。 システム: 猫がソファの上で寝ています。",
    "The quick brown fox jumps over the lazy dog. 123 456 [0.12, 0.55, 0.40, 0.98]",
]


def byte_bpe_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few Japanese sentences (merges cross segment
    boundaries, unlike the char tokenizer). With `bos`, it prepends <s> like Llama's."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<EOD|LLM-jp>", "<s>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(JA_CORPUS * 20, trainer)
    kwargs = {}
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
        )
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<EOD|LLM-jp>", pad_token="<pad>", **kwargs)


def write_preset(path: Path, **overrides) -> Path:
    """The tiny preset with fields replaced (nested dicts merged one level deep)."""
    from llava_jp.presets.builder import PRESET_DIR

    data = yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text(encoding="utf-8"))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def losses_by_step(out_dir) -> dict[int, float]:
    """Loss per step from a run's log.jsonl; a resumed run's repeat of a step replaces it."""
    import json

    records = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def save_sensitive_tiny_model(path: Path, preset: str = "tiny") -> Path:
    """Save a tiny model whose answers depend clearly on the image, the question and the history.

    At the default init (std 0.02) a random LM answers almost the same whatever it is asked,
    which would let a mix-up between chat sessions go unnoticed; std 0.2 weights give every
    conversation its own answers (the demo tests assert it).
    """
    import torch

    from llava_jp.presets.builder import build

    torch.manual_seed(0)
    model, processor = build(preset, pretrained=False)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.normal_(0, 0.2)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def chat_text(content) -> str:
    """A chat message's text, whether Gradio sent a string or a list of parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def chat_pairs(chat) -> list[tuple[str, str]]:
    """A Gradio chat as (user turn, assistant turn) pairs, each "role:text"."""
    return [(chat[i]["role"] + ":" + chat_text(chat[i]["content"]),
             chat[i + 1]["role"] + ":" + chat_text(chat[i + 1]["content"])) for i in range(0, len(chat), 2)]


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The supervised spans of a sample (consecutive labels that are not ignored), each checked
    to equal the input ids at those positions."""
    from llava_jp.core.modeling import IGNORE_INDEX

    runs, current = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    return runs + ([current] if current else [])
