"""Tiny components built locally for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava_jp.templates import LLM_JP_V1_SYSTEM

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
    from llava_jp.builder import PRESET_DIR

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
