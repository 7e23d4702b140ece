"""Adapter so the llm-jp-eval-mm harness can run llava-jp models.

The harness instantiates ``cls(model_id)`` through ``model_table.get_class_from_model_id`` and
calls ``generate(images, text, gen_kwargs)`` (one sample) or ``batch_generate(images_list,
text_list, gen_kwargs)``; ``gen_kwargs`` is its ``GenerationConfig`` dataclass (its CLI passes
max_new_tokens 256, greedy; the dataclass default is 1024).

The released harness (PyPI ``eval-mm`` 0.4.1) needs Python >= 3.12 and ``datasets==2.18.0``,
so it lives in its own environment, without torch. ``scripts/eval_mm_harness.py`` runs there:
the harness's own tasks, scorers and judge client, with generation delegated to :func:`serve`
in llava-jp's environment (one JSON line per question over a pipe). See docs/eval.md.
"""

from __future__ import annotations

import json
import sys
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
    """llm-jp-eval-mm model: a llava-jp model folder or hub id. Several images for one question
    are shown side by side (our models take one image), as ``llava-jp eval`` does."""

    def __init__(self, model_id: str, device: str | None = None, answer_fn: AnswerFn | None = None):
        self.model_id = model_id
        self._answer = answer_fn if answer_fn is not None else self._load(model_id, device)

    @staticmethod
    def _load(model_id: str, device: str | None) -> AnswerFn:
        import functools

        from llava_jp.eval.runner import load_model
        from llava_jp.infer.generate import generate_answers

        return functools.partial(generate_answers, *load_model(model_id, device))

    def generate(self, images: list[Image.Image] | None, text: str, gen_kwargs: Any = None) -> str:
        """Answer one question about its images (none: text-only)."""
        return self.batch_generate([images], [text], gen_kwargs)[0]

    def batch_generate(
        self,
        images_list: Sequence[list[Image.Image] | None],
        text_list: Sequence[str],
        gen_kwargs: Any = None,
    ) -> list[str]:
        """Answer a batch of (images, question) pairs in one batched call."""
        from llava_jp.eval.tasks import side_by_side

        if len(images_list) != len(text_list):
            raise ValueError(f"{len(images_list)} image lists but {len(text_list)} texts")
        images = [
            side_by_side([im.convert("RGB") for im in sample_images]) if sample_images else None
            for sample_images in images_list
        ]
        questions = [text.replace("<image>", "").strip() for text in text_list]
        return list(self._answer(images, questions, **generation_kwargs(gen_kwargs)))


def get_class_from_model_id(model_id: str, runtime: str | None = None) -> type[VLM]:
    """What the harness's ``model_table`` module must provide: every model id maps to :class:`VLM`."""
    return VLM


def serve(model_id: str, requests=None, replies=None, device: str | None = None) -> None:
    """Answer JSON-line requests ``{"images": [png paths], "text", "gen_kwargs"}`` with
    ``{"text": answer}`` lines (or ``{"error": message}``), one per request, until end of input.

    Replies go to the real stdout; anything else printed while loading or generating goes to
    stderr so it cannot corrupt the protocol.
    """
    requests = requests or sys.stdin
    replies = replies or sys.stdout
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        vlm = VLM(model_id, device)
        print(json.dumps({"ready": model_id}), file=replies, flush=True)
        for line in requests:
            if not line.strip():
                continue
            request = json.loads(line)
            try:
                images = []
                for path in request.get("images") or []:
                    with Image.open(path) as image:
                        images.append(image.convert("RGB"))
                reply = {"text": vlm.generate(images, request["text"], request.get("gen_kwargs"))}
            except Exception as err:  # noqa: BLE001 -- one bad sample must not end the run; the harness records it
                reply = {"error": f"{type(err).__name__}: {err}"}
            print(json.dumps(reply, ensure_ascii=False), file=replies, flush=True)
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        print("usage: python -m llava_jp.eval.llm_jp_eval_mm MODEL_ID [DEVICE]", file=sys.stderr)
        sys.exit(2)
    serve(sys.argv[1], device=sys.argv[2] if len(sys.argv) == 3 else None)
