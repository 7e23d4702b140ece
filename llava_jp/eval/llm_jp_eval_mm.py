"""Adapter so the llm-jp-eval-mm harness can run llava-jp models.

The harness instantiates ``cls(model_id)`` through ``model_table.get_class_from_model_id`` and
calls ``generate(images, text, gen_kwargs)`` (one sample) or ``batch_generate(images_list,
text_list, gen_kwargs)``; ``gen_kwargs`` is its ``GenerationConfig`` dataclass (max_new_tokens
256, greedy by default). Point the harness at this class with a one-line ``model_table.py`` in a
folder passed as ``--adapter_dir`` (see docs/eval.md)::

    from llava_jp.eval.llm_jp_eval_mm import get_class_from_model_id
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

GENERATION_FIELDS = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "use_cache")

AnswerFn = Callable[..., list[str]]  # (images, questions, **generation kwargs) -> answers


def generation_kwargs(gen_kwargs: Any = None) -> dict:
    """The harness's ``GenerationConfig`` (or a dict) as ``generate`` keyword arguments.

    Greedy unless ``do_sample`` is set, in which case temperature/top_p are passed on too.
    """
    if gen_kwargs is None:
        return {"max_new_tokens": 256}
    fields = dict(gen_kwargs) if isinstance(gen_kwargs, dict) else dict(vars(gen_kwargs))
    kwargs = {k: fields[k] for k in GENERATION_FIELDS if k in fields}
    if not kwargs.get("do_sample"):
        kwargs.pop("temperature", None)
        kwargs.pop("top_p", None)
    return kwargs


class VLM:
    """llm-jp-eval-mm model: a llava-jp model folder or hub id, at most one image per question."""

    def __init__(self, model_id: str, device: str | None = None, answer_fn: AnswerFn | None = None):
        self.model_id = model_id
        self._answer = answer_fn if answer_fn is not None else self._load(model_id, device)

    @staticmethod
    def _load(model_id: str, device: str | None) -> AnswerFn:
        import functools

        from llava_jp.infer.generate import generate_answers

        from llava_jp.eval.runner import load_model

        return functools.partial(generate_answers, *load_model(model_id, device))

    def generate(self, images: list[Image.Image] | None, text: str, gen_kwargs: Any = None) -> str:
        """Answer one question about one image."""
        return self.batch_generate([images], [text], gen_kwargs)[0]

    def batch_generate(
        self,
        images_list: Sequence[list[Image.Image] | None],
        text_list: Sequence[str],
        gen_kwargs: Any = None,
    ) -> list[str]:
        """Answer a batch of (images, question) pairs: one image each, or none (text-only)."""
        if len(images_list) != len(text_list):
            raise ValueError(f"{len(images_list)} image lists but {len(text_list)} texts")
        images = []
        for i, sample_images in enumerate(images_list):
            if sample_images and len(sample_images) > 1:
                raise ValueError(
                    f"sample {i} has {len(sample_images)} images; llava-jp models take at most one"
                )
            images.append(sample_images[0].convert("RGB") if sample_images else None)
        questions = [text.replace("<image>", "").strip() for text in text_list]
        return list(self._answer(images, questions, **generation_kwargs(gen_kwargs)))


def get_class_from_model_id(model_id: str, runtime: str | None = None) -> type[VLM]:
    """What the harness's ``model_table`` module must provide: every model id maps to :class:`VLM`."""
    return VLM
