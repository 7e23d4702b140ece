"""`llava-jp infer`: answer a JSONL file of questions in batches, resumably.

Input, one JSON object a line (LLaVA's `model_vqa` question files work as they are)::

    {"question_id": 1, "image": "cat.jpg", "text": "この画像について説明してください。"}
    {"id": "q2", "image": null, "question": "日本の首都はどこですか？"}

- the key: `question_id` or `id`; without either, the line number (1-based);
- the question: `question` or `text` (an `<image>` marker in it is dropped: the image always
  goes first);
- `image`: a path (relative paths are resolved against `--image-root`, default the folder of
  the questions file), or null / absent for a text-only question.

Output: each input record with `"answer"` added (and `"id"`, the line number, when it had none), appended after every batch. A rerun with the
same `--out` skips every key already answered, so a killed run resumes where it stopped and
re-answers nothing. Answers come from `generate_answers`, the batched engine `llava-jp eval`
uses (greedy unless sampling is asked for).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from llava_jp.core.processing import ImageLoadError, load_image
from llava_jp.core.templates import IMAGE_MARKER
from llava_jp.eval._jsonl import append_records, read_records
from llava_jp.infer.generate import generate_answers

ID_FIELDS = ("question_id", "id")
QUESTION_FIELDS = ("question", "text")


class InferError(ValueError):
    """A problem with the user's input files or flags (reported in one line, exit 2)."""


@dataclass(frozen=True)
class Question:
    key: str
    record: dict  # as read, plus "id" when it had none: the answer line is this + "answer"
    question: str
    image: Path | None


def _first(record: dict, names: tuple[str, ...]):
    return next(((n, record[n]) for n in names if record.get(n) is not None), (None, None))


def read_questions(path: Path, image_root: Path | None = None) -> list[Question]:
    """Every question in `path`, checked up front (fields, unique keys, image files exist) so
    a mistake stops the run before the model is loaded, not hours into it."""
    if not path.is_file():
        raise InferError(f"--data {path}: no such file")
    image_root = image_root if image_root is not None else path.parent
    questions, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InferError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise InferError(f"{where}: expected a JSON object, got {type(record).__name__}")
            _, key = _first(record, ID_FIELDS)
            if key is None:  # the answer carries the line number, to join answers to questions
                record, key = {"id": number, **record}, number
            key = str(key)
            if key in seen:
                raise InferError(f"{where}: id {key!r} already used on line {seen[key]}")
            seen[key] = number
            name, question = _first(record, QUESTION_FIELDS)
            if not isinstance(question, str) or not question.replace(IMAGE_MARKER, "").strip():
                raise InferError(f"{where}: needs a non-empty string field 'question' (or 'text')")
            image = record.get("image")
            if image is not None:
                if not isinstance(image, str):
                    raise InferError(f"{where}: 'image' must be a path or null, got {type(image).__name__}")
                image = image_root / image
                if not image.is_file():
                    raise InferError(f"{where}: image file {image} not found")
            questions.append(Question(key, record, question.replace(IMAGE_MARKER, "").strip(), image))
    return questions


def answered_keys(out: Path) -> set[str]:
    """Keys already answered in `out` (a partial last line from a killed run is cut off)."""
    return {str(_first(record, ID_FIELDS)[1]) for record in read_records(out)}


def infer_file(
    model,
    processor,
    data: Path,
    out: Path,
    batch_size: int = 8,
    image_root: Path | None = None,
    progress: bool = True,
    **gen_kwargs,
) -> int:
    """Answer the questions of `data` not yet in `out`; returns how many were answered now."""
    questions = read_questions(data, image_root)
    done = answered_keys(out)
    todo = [q for q in questions if q.key not in done]
    with tqdm(total=len(questions), initial=len(questions) - len(todo), desc="infer", unit="q",
              disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images = [None if q.image is None else _load(q) for q in batch]
            answers = generate_answers(model, processor, images, [q.question for q in batch], **gen_kwargs)
            append_records(out, [{**q.record, "answer": a} for q, a in zip(batch, answers, strict=True)])
            bar.update(len(batch))
    return len(todo)


def _load(q: Question):
    try:
        return load_image(q.image)
    except ImageLoadError as err:  # the message names the file
        raise InferError(f"question {q.key!r}: {err}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="saved model directory or hub id")
    parser.add_argument("--data", required=True, help="questions, one JSON object a line")
    parser.add_argument("--out", required=True, help="answers JSONL (appended; rerun with it to resume)")
    parser.add_argument("--image-root", default=None, help="folder relative image paths start from "
                        "(default: the folder of --data)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--device", default="auto", help="torch device (default: the GPU if any, else the CPU)")


def run(args: argparse.Namespace) -> int:
    from llava_jp.infer.chat import ChatError, load_model

    try:
        if args.batch_size < 1:
            raise InferError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.max_new_tokens < 1:
            raise InferError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        data, out = Path(args.data), Path(args.out)
        image_root = Path(args.image_root) if args.image_root else None
        if image_root is not None and not image_root.is_dir():
            raise InferError(f"--image-root {image_root}: no such folder")
        read_questions(data, image_root)  # input mistakes are reported before the model loads
        model, processor = load_model(args.model, args.device)
        answered = infer_file(model, processor, data, out, args.batch_size, image_root,
                              max_new_tokens=args.max_new_tokens)
    except (InferError, ChatError) as err:
        print(f"llava-jp infer: {err}", file=sys.stderr)
        return 2
    print(f"answered {answered} question(s); all answers in {out}")
    return 0
