"""The three Japanese VLM benchmarks as lists of samples, loaded from the hub or a local copy.

Schemas (as published on the hub; tests build tiny copies of each):

``ja-vg-vqa-500``: ``SakanaAI/JA-VG-VQA-500``, split ``test``, one row per image:
    ``image_id, url, width, height, coco_id, flickr_id, image,
    qas: [{qa_id, question, answer, q_objects, a_objects}]``. Every QA is a sample (id ``qa_id``),
    as llm-jp-eval-mm does; under the Sakana protocol only ``qas[0]`` of each image is.
``ja-vlm-bench-in-the-wild``: ``SakanaAI/JA-VLM-Bench-In-the-Wild``, split ``test``:
    ``page_url, image_url, image, question, answer``; sample id = row index.
``heron-bench``: ``turing-motors/Japanese-Heron-Bench`` is a file repository, not a table:
    ``questions_ja.jsonl`` ({question_id, image, category, image_category, text}),
    ``context_ja.jsonl`` ({id, image, caption}), ``answers_gpt4.jsonl`` ({question_id, text, ...},
    the GPT-4 reference answers) and ``images/NNN.jpg``. The same data flattened into one table
    (``Silviase/Japanese-Heron-Bench``, split ``train``, what llm-jp-eval-mm loads) has
    ``question_id, image, category, image_category, context, text,
    answer: {gpt-4-0125-preview, ...}``. Both load here; the reference answer is GPT-4's.

llm-jp-eval-mm's further Japanese tasks, with the harness's prompts (``eval_mm/tasks/*.py`` of
``eval-mm`` 0.4.1; scored in ``harness_metrics.py``):

``jmmmu``: ``JMMMU/JMMMU``, one config per subject, split ``test``; MMMU's columns ``id`` (e.g.
    ``test_Accounting_1``), ``question``, ``options`` (a Python-literal list as a string),
    ``answer``, ``question_type`` (``multiple-choice`` / ``open``), ``image_1`` … ``image_7``, …
``jdocqa``: ``speed/JDocQA``, split ``test``: ``question_id, question, answer, answer_type``
    (0 yes/no, 1 factoid, 2 numerical, 3 open-ended), ``image_0`` … ``image_3``.
``mecha-ja``: ``llm-jp/MECHA-ja``, split ``test``: ``question, options`` (list), ``answer``
    (index 0-3), ``answer_type`` (0 Factoid, 1 Non-Factoid), ``image, background_text``.

A sample with several images (JMMMU, JDocQA) is shown to our one-image models as the images
side by side, as the harness's single-image adapters do (``examples/japanese_stable_vlm.py``).

A ``source`` is a hub id, a parquet file, a folder of parquet files named by split
(``test-00000-of-00001.parquet`` or ``test/…``), a ``save_to_disk`` folder, or — for Heron-Bench —
a folder in the original file layout.
"""

from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

HERON_REFERENCE_MODEL = "gpt-4-0125-preview"
HERON_CATEGORIES = ("conv", "detail", "complex")


@dataclass(frozen=True)
class Sample:
    """One question to answer. ``row`` indexes the task's rows, where the image lives."""

    id: str
    question: str
    reference: str
    row: int
    category: str | None = None  # heron-bench: conv / detail / complex; own data: question type
    context: str | None = None  # heron-bench: the image description the judge reads
    image_keys: tuple[str, ...] = ("image",)  # the row's image columns, shown side by side
    fields: dict | None = None  # what a harness scorer reads besides the reference


@dataclass
class EvalTask:
    """A loaded benchmark: its samples, and the rows their images are decoded from on demand."""

    name: str
    metric: str  # "rouge-l" or "heron-bench"
    samples: list[Sample]
    rows: Any  # datasets.Dataset or list of dicts, indexable by Sample.row
    base_dir: Path | None = None  # for image paths stored relative to the source folder

    def image(self, sample: Sample) -> Image.Image | None:
        """The sample's image as RGB, None for a text-only sample; several images are placed
        side by side. Decoded now, so only unfinished samples pay for it."""
        row = self.rows[sample.row]
        images = [to_pil(row[k], self.base_dir) for k in sample.image_keys if row.get(k) is not None]
        return side_by_side(images) if images else None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hub_id: str
    split: str
    metric: str
    build: Callable[..., list[Sample]]


def to_pil(value: Any, base_dir: Path | None = None) -> Image.Image:
    """An image cell (PIL image, ``{"bytes", "path"}`` struct, or file path) as an RGB image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    else:
        path = Path(value["path"] if isinstance(value, dict) else value)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        image = Image.open(path)
    return image.convert("RGB")


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """One image: ``images`` scaled to a common height and placed left to right."""
    if len(images) == 1:
        return images[0]
    height = max(im.height for im in images)
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in scaled), height), "white")
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def _require(row: dict, columns: Sequence[str], task: str) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise ValueError(f"{task}: rows lack column(s) {missing}; found {sorted(row)}")


def _vg_vqa_samples(rows, protocol: str) -> list[Sample]:
    samples = []
    for i, row in enumerate(rows):
        _require(row, ["qas"], "ja-vg-vqa-500")
        qas = row["qas"] if protocol == "llm-jp-eval-mm" else row["qas"][:1]
        samples += [Sample(str(qa["qa_id"]), qa["question"], qa["answer"], i) for qa in qas]
    return samples


def _wild_samples(rows, protocol: str) -> list[Sample]:
    samples = []
    for i, row in enumerate(rows):
        _require(row, ["question", "answer"], "ja-vlm-bench-in-the-wild")
        samples.append(Sample(str(i), row["question"], row["answer"], i))
    return samples


def _heron_samples(rows, protocol: str) -> list[Sample]:
    samples = []
    for i, row in enumerate(rows):
        _require(row, ["question_id", "category", "context", "text", "answer"], "heron-bench")
        if row["category"] not in HERON_CATEGORIES:
            raise ValueError(f"heron-bench: unknown category {row['category']!r} in row {i}")
        samples.append(
            Sample(
                str(row["question_id"]),
                row["text"],
                row["answer"][HERON_REFERENCE_MODEL],
                i,
                category=row["category"],
                context=row["context"],
            )
        )
    return samples


# ---- llm-jp-eval-mm's prompts (eval_mm/tasks/jmmmu.py, mecha_ja.py of eval-mm 0.4.1) ----------

MULTI_CHOICE_PROMPT = "与えられた選択肢の中から最も適切な回答のアルファベットを直接記入してください。"
OPEN_ENDED_PROMPT = "質問に対する回答を単語や短いフレーズで記入してください。"


def lettered_options(options: Sequence[str]) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))


def jmmmu_prompt(row: dict) -> str:
    """The harness's JMMMU prompt; ``<image N>`` references become ``<image>``."""
    question = row["question"].replace("<image1>", "<image 1>")
    if row["question_type"] == "multiple-choice":
        options = lettered_options(ast.literal_eval(row["options"]))
        question = f"{question}\n{options}\n\n{MULTI_CHOICE_PROMPT}"
    else:
        question = f"{question}\n\n{OPEN_ENDED_PROMPT}"
    return question


def _harness_text(prompt: str) -> str:
    """What the harness hands a model: ``<image N>`` as ``<image>``, then ``<image>`` removed."""
    for i in range(1, 8):
        prompt = prompt.replace(f"<image {i}>", "<image>")
    return prompt.replace("<image>", "").strip()


def _jmmmu_samples(rows, protocol: str) -> list[Sample]:
    samples = []
    for i, row in enumerate(rows):
        _require(row, ["id", "question", "options", "answer", "question_type"], "jmmmu")
        prompt = jmmmu_prompt(row)
        keys = sorted({t.strip("<>").replace(" ", "_") for t in re.findall(r"<image \d+>", prompt)})
        fields = {k: row[k] for k in ("id", "question_type", "options", "answer")}
        samples.append(Sample(str(row["id"]), _harness_text(prompt), str(row["answer"]), i,
                              category=row["question_type"], image_keys=tuple(keys), fields=fields))
    return samples


JDOCQA_ANSWER_TYPES = ("yesno", "factoid", "numerical", "open-ended")


def _jdocqa_samples(rows, protocol: str) -> list[Sample]:
    samples = []
    for i, row in enumerate(rows):
        _require(row, ["question_id", "question", "answer", "answer_type"], "jdocqa")
        samples.append(Sample(str(row["question_id"]), row["question"], row["answer"], i,
                              category=JDOCQA_ANSWER_TYPES[row["answer_type"]],
                              image_keys=("image_0", "image_1", "image_2", "image_3"),
                              fields={"answer_type": row["answer_type"]}))
    return samples


MECHA_ANSWER_TYPES = ("Factoid", "Non-Factoid")


def _mecha_samples(rows, protocol: str) -> list[Sample]:
    samples = []
    for i, row in enumerate(rows):
        _require(row, ["question", "options", "answer", "answer_type", "background_text"], "mecha-ja")
        prompt = f"{row['question']}\n{lettered_options(row['options'])}\n\n{MULTI_CHOICE_PROMPT}"
        samples.append(Sample(str(i), prompt, chr(ord("A") + row["answer"]), i,
                              category=MECHA_ANSWER_TYPES[row["answer_type"]],
                              fields={"question_id": str(i), "answer_type": row["answer_type"],
                                      "background_text": row["background_text"]}))
    return samples


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("ja-vg-vqa-500", "SakanaAI/JA-VG-VQA-500", "test", "rouge-l", _vg_vqa_samples),
        TaskSpec(
            "ja-vlm-bench-in-the-wild",
            "SakanaAI/JA-VLM-Bench-In-the-Wild",
            "test",
            "rouge-l",
            _wild_samples,
        ),
        TaskSpec(
            "heron-bench", "turing-motors/Japanese-Heron-Bench", "train", "heron-bench", _heron_samples
        ),
        TaskSpec("jmmmu", "JMMMU/JMMMU", "test", "jmmmu", _jmmmu_samples),
        TaskSpec("jdocqa", "speed/JDocQA", "test", "jdocqa", _jdocqa_samples),
        TaskSpec("mecha-ja", "llm-jp/MECHA-ja", "test", "mecha-ja", _mecha_samples),
    )
}


# The benchmarks ``llava-jp eval`` runs by default: the ones with published llava-jp scores.
DEFAULT_TASKS = ("ja-vg-vqa-500", "ja-vlm-bench-in-the-wild", "heron-bench")


def _without_images(rows):
    """The rows with their image columns dropped, so building samples decodes no image."""
    if isinstance(rows, list):
        return rows
    import datasets

    return rows.remove_columns(
        [c for c, f in rows.features.items() if isinstance(f, datasets.Image) or c == "image"]
    )


def _is_heron_file_layout(path: Path) -> bool:
    return (path / "questions_ja.jsonl").is_file()


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _heron_rows_from_files(root: Path) -> list[dict]:
    """Flatten the original Heron-Bench files into rows of the one-table schema."""
    questions = _read_jsonl(root / "questions_ja.jsonl")
    captions = {c["image"]: c["caption"] for c in _read_jsonl(root / "context_ja.jsonl")}
    answers = {a["question_id"]: a["text"] for a in _read_jsonl(root / "answers_gpt4.jsonl")}
    rows = []
    for q in questions:
        if q["image"] not in captions or q["question_id"] not in answers:
            raise ValueError(
                f"heron-bench: question {q['question_id']} has no context or GPT-4 answer in {root}"
            )
        rows.append(
            {
                "question_id": q["question_id"],
                "image": str(Path("images") / q["image"]),
                "category": q["category"],
                "image_category": q.get("image_category"),
                "context": captions[q["image"]],
                "text": q["text"],
                "answer": {HERON_REFERENCE_MODEL: answers[q["question_id"]]},
            }
        )
    return rows


def _parquet_table(files: Sequence[Path]):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    # In memory, no HF cache: the benchmark files are small (< 100 MB).
    # promote: subjects whose unused image columns are all null still concatenate
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    return datasets.Dataset(table)


def _split_files(folder: Path, split: str) -> list[Path]:
    files = sorted(folder.rglob("*.parquet"))
    chosen = [f for f in files if f.name.startswith(f"{split}-") or f.stem == split or f.parent.name == split]
    if not chosen:
        raise FileNotFoundError(
            f"no parquet file for split {split!r} under {folder} (expected {split}-*.parquet or "
            f"{split}/*.parquet; found {[str(f.relative_to(folder)) for f in files]}); "
            "pass the parquet file itself to use it whatever its name"
        )
    return chosen


def open_rows(source: str | Path, split: str):
    """The table a source names: hub id, parquet file, parquet folder or ``save_to_disk`` folder."""
    path = Path(source)
    if path.is_file():
        return _parquet_table([path])
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return _parquet_table(_split_files(path, split))
    import datasets

    configs = datasets.get_dataset_config_names(str(source))
    if len(configs) > 1:  # JMMMU: one config per subject, all of them are the benchmark
        return datasets.concatenate_datasets(
            [datasets.load_dataset(str(source), name=c, split=split) for c in configs]
        )
    return datasets.load_dataset(str(source), split=split)


def _heron_file_root(source: str | Path) -> Path | None:
    """The folder holding Heron-Bench's original files, downloading them for the hub id."""
    path = Path(source)
    if path.is_dir():
        return path if _is_heron_file_layout(path) else None
    if str(source) == TASKS["heron-bench"].hub_id:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(source),
            repo_type="dataset",
            allow_patterns=["*.jsonl", "images/*"],
        )
        return Path(local)
    return None


def load_task(
    name: str,
    source: str | Path | None = None,
    *,
    split: str | None = None,
    protocol: str = "llm-jp-eval-mm",
    limit: int | None = None,
) -> EvalTask:
    """Load benchmark ``name`` from ``source`` (default: its hub id).

    ``protocol`` only changes which JA-VG-VQA-500 QAs are samples (all, or ``qas[0]`` for
    ``"sakana"``). ``limit`` keeps the first N samples (smoke runs; scores are then not comparable).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if protocol not in ("llm-jp-eval-mm", "sakana"):
        raise ValueError(f"unknown protocol {protocol!r}")
    spec = TASKS[name]
    source = spec.hub_id if source is None else source
    base_dir = Path(source) if Path(source).is_dir() else None

    heron_root = _heron_file_root(source) if name == "heron-bench" else None
    if heron_root is not None:
        rows, base_dir = _heron_rows_from_files(heron_root), heron_root
    else:
        rows = open_rows(source, split or spec.split)

    samples = spec.build(_without_images(rows), protocol)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: sample ids are not unique in {source}")
    if limit is not None:
        samples = samples[:limit]
    return EvalTask(name, spec.metric, samples, rows, base_dir)


# ---- own data ---------------------------------------------------------------------------------

TYPE_FIELDS = ("question_type", "type", "category")  # first present names a sample's type


def _is_flat(record: dict) -> bool:
    return isinstance(record.get("question"), str) and isinstance(record.get("answer"), str)


def load_own_data(path: str | Path, image_folder: str | Path | None = None, limit: int | None = None) -> EvalTask:
    """A held-out set in LLaVA format as a task named after the file.

    Flat records ``{"id", "image", "question", "answer", "type"}`` (the quickstart's
    ``test.json``) are read as one-pair conversations.

    Each (human, gpt) turn pair of a record is one sample (id ``<id>`` for the first pair,
    ``<id>#<n>`` for later ones); ``<image>`` is removed from the question; ``image`` is resolved
    against ``image_folder`` (default: the file's folder); a record without one is text-only.
    The record's ``question_type`` / ``type`` / ``category`` field, if any, is its type.
    """
    from llava_jp.core.templates import normalize_conversation

    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA-format records")  # noqa: TRY004 -- reported as a bad file
    base_dir = Path(image_folder) if image_folder is not None else path.parent
    rows, samples = [], []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not ("conversations" in record or _is_flat(record)):
            raise ValueError(f"{path}: record {i} has neither 'conversations' nor 'question'/'answer'")
        record_id = str(record.get("id", i))
        raw = record.get("conversations") or [
            {"from": "human", "value": record["question"]}, {"from": "gpt", "value": record["answer"]}
        ]
        try:
            turns = normalize_conversation(raw)
        except ValueError as err:
            raise ValueError(f"{path}: record {record_id}: {err}") from None
        image = record.get("image")
        if image is not None and not (base_dir / image).is_file():
            raise ValueError(f"{path}: record {record_id}: image {image!r} not found under {base_dir}")
        rows.append({"image": image})
        kind = next((str(record[f]) for f in TYPE_FIELDS if record.get(f) is not None), None)
        pairs = [(q, a) for q, a in zip(turns[::2], turns[1::2])
                 if q["role"] == "user" and a["role"] == "assistant"]
        if not pairs:
            raise ValueError(f"{path}: record {record_id} has no question/answer pair")
        for n, (question, answer) in enumerate(pairs):
            samples.append(Sample(record_id if n == 0 else f"{record_id}#{n}",
                                  question["content"].replace("<image>", "").strip(),
                                  answer["content"], i, category=kind))
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: record ids are not unique")
    if limit is not None:
        samples = samples[:limit]
    return EvalTask(path.stem, "own", samples, rows, base_dir)
