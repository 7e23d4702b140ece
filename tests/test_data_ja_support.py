"""Helpers for the data_ja tests (no tests here): a tiny character-level tokenizer on disk."""

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[EOS]"]


def build_char_tokenizer(chars: str, directory: Path) -> Path:
    """Saves a one-token-per-character tokenizer over `chars` to `directory` (AutoTokenizer
    loads it back)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(set(chars)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]",
                                        unk_token="[UNK]", eos_token="[EOS]")
    tokenizer.save_pretrained(directory)
    return directory
