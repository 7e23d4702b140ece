"""Small Japanese tokenizers built offline, for the tiny preset, tests and the quickstart.

Real presets use the LM's own tokenizer from the hub. `build_char_tokenizer` gives one token
per character; `build_bpe_tokenizer` a byte-level BPE trained (deterministically, in well
under a second) on the templates and the synthetic data's words, so prompts are short, as
with a real tokenizer, and any text still round-trips through bytes.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llava_jp.core.templates import LLM_JP_V1_SYSTEM

EOS_TOKEN = "<EOD|LLM-jp>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

# The kanji that the bundled synthetic data and the templates use, beyond kana and ASCII.
_KANJI = "色形何丸四角三数字赤青緑黄白黒紫灰茶桃橙大小左右上下中央画像写真文書答問題質問正解誤一二五六七八九十百千色合図見私"


def base_characters() -> str:
    """ASCII, hiragana, katakana, CJK and full-width punctuation, template and data kanji."""
    chars = [chr(c) for c in range(0x20, 0x7F)] + ["\n"]
    chars += [chr(c) for c in range(0x3041, 0x3097)]  # hiragana
    chars += [chr(c) for c in range(0x30A1, 0x30FB)] + ["ー"]  # katakana
    chars += list("、。「」『』・！？：（）［］〜…　")
    chars += [chr(c) for c in range(0xFF10, 0xFF1A)]  # full-width digits
    chars += list(LLM_JP_V1_SYSTEM + "ユーザーシステム" + _KANJI)
    return "".join(dict.fromkeys(chars))


def build_char_tokenizer(extra_characters: str = "") -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` with one token per character of `base_characters() + extra`."""
    specials = [PAD_TOKEN, UNK_TOKEN, EOS_TOKEN]
    chars = dict.fromkeys(base_characters() + extra_characters)
    vocab = {tok: i for i, tok in enumerate(specials + [c for c in chars if c not in specials])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
        model_max_length=4096,
    )


def _bpe_corpus() -> list[str]:
    from llava_jp.synthetic import COLOURS, PATTERNS, QUESTIONS, SHAPES, caption
    from llava_jp.core.templates import TEMPLATES

    texts = [t.system + t.user_prefix + t.assistant_prefix + t.turn_separator + t.user_prefix for t in TEMPLATES.values()]
    texts += list(QUESTIONS.values()) + list(COLOURS) + list(SHAPES) + list(PATTERNS) + [str(d) for d in range(10)]
    texts += [caption({"color": c, "shape": s, "pattern": p}) for c in COLOURS for s in SHAPES for p in PATTERNS]
    return texts * 4 + list(base_characters())


def build_bpe_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the templates and synthetic-data vocabulary."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, UNK_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_bpe_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
                                   model_max_length=4096, clean_up_tokenization_spaces=False)
