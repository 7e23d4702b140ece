"""One-shot batched inference: (images, questions) -> answers."""

from __future__ import annotations

from collections.abc import Sequence

from llava_jp.core.processing import ImageLike


def generate_answers(
    model,
    processor,
    images: Sequence[ImageLike | None],
    questions: Sequence[str],
    max_new_tokens: int = 256,
    **gen_kwargs,
) -> list[str]:
    """Answer each question about its image (None for a text-only question) in one batch.

    Prompts are left-padded; decoding is greedy unless `gen_kwargs` says otherwise.
    """
    batch = processor(text=list(questions), images=list(images)).to(model.device)
    gen_kwargs.setdefault("do_sample", False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, **gen_kwargs)
    new_tokens = out[:, batch["input_ids"].shape[1]:]  # generate returns prompt + new tokens
    return [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]
