"""Training data: LLaVA-format records -> tokenized samples -> grouped batches.

Tokenization runs once through `datasets.map` (cached on disk for file-backed data), token
lengths come from it, and images are opened lazily in the collator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from PIL import Image
from torch.utils.data import DataLoader

from llava_jp.errors import UserError, loading, looks_like_path, read_json, read_jsonl
from llava_jp.train.features import FeatureCache
from llava_jp.core.modeling import IGNORE_INDEX
from llava_jp.core.processing import ImageLoadError, LlavaJpProcessor, load_image
from llava_jp.core.templates import (
    conversation_issues,
    get_template,
    normalize_conversation,
    plain_caption_messages,
)

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A sample that cannot be trained on; the message names the sample."""


# samples too long for max_length (found at tokenization, like `CONVERSATION_FAULTS`)
LENGTH_FAULTS = ("image_cut_by_max_length", "image_beyond_max_length", "no_complete_answer_within_max_length")
# part of the tokenization cache key: bump it when `encode_record`'s rules change
ENCODING_VERSION = 3


def load_records(data_path: str) -> tuple[datasets.Dataset, str]:
    """A LLaVA-format JSON list / JSONL file, a saved `datasets` directory, or a hub dataset id.

    Returns the records and a fingerprint of the source (file identity, or the dataset's own).
    """
    path = Path(data_path)
    if path.is_file():
        rows = read_jsonl(path, "data_path") if path.suffix == ".jsonl" else read_json(path, "data_path")
        if not isinstance(rows, list):
            raise UserError(f"{data_path}: expected a JSON list of samples, got {type(rows).__name__}")
        rows = [r if isinstance(r, dict) else {} for r in rows]
        # turing-motors/LLaVA-v1.5-Instruct-620K-JA writes `image` as a path or a list of one path
        images = [r.get("image") for r in rows]
        images = [im[0] if isinstance(im, list) and len(im) == 1 else im for im in images]
        # conversations are kept as JSON text: Arrow needs one schema, LLaVA rows vary
        return datasets.Dataset.from_dict({
            "id": [_storable(str(r.get("id", i))) for i, r in enumerate(rows)],
            "image": [_storable(im) if isinstance(im, str) else None for im in images],
            "image_error": ["" if im is None or isinstance(im, str) else f"'image' must be one path, got {im!r:.80}"
                            for im in images],
            "conversations": [_storable(json.dumps(r.get("conversations"), ensure_ascii=False), json.dumps(r.get("conversations")))
                              for r in rows],
        }), _file_fingerprint(path)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
    else:
        if path.suffix in (".json", ".jsonl") or looks_like_path(data_path):
            raise UserError(f"data_path {data_path!r}: no such file or folder")
        with loading(data_path, "data_path"):
            ds = datasets.load_dataset(data_path, split="train")
    fingerprint = ds._fingerprint
    return ds.map(lambda r: {"conversations": json.dumps(r["conversations"], ensure_ascii=False)}), fingerprint


def _storable(text: str, fallback: str | None = None) -> str:
    """`text` if Arrow can store it, else `fallback` (or `text` with backslash escapes): JSON
    escapes such as "\\ud800" decode to lone surrogates, which are not UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return fallback if fallback is not None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


@dataclass
class DataReport:
    """What happened to every sample: kept, truncated, or dropped by reason at tokenization;
    then, while training, skipped by reason (image faults, found when a batch is built: counted
    each time the sample comes up, i.e. once per epoch) and how many samples were trained on."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    trained: int = 0

    def as_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "truncated": self.truncated, "dropped": dict(self.dropped),
                "skipped_in_training": dict(self.skipped), "trained_samples": self.trained}


def encode_record(record: dict, processor: LlavaJpProcessor, max_length: int, plain: bool) -> dict:
    """One record -> input_ids, labels, length, image, status ("ok", "truncated" or a drop reason:
    one of `CONVERSATION_FAULTS` or `LENGTH_FAULTS`)."""
    out = {"input_ids": [], "labels": [], "length": 0, "status": "ok", "error": ""}
    if record.get("image_error"):
        out.update(status="malformed_sample", error=f"sample {record['id']!r}: malformed_sample: {record['image_error']}")
        return out
    try:
        raw = json.loads(record["conversations"])
        issues = conversation_issues(raw, 1 if record.get("image") else 0)
        if issues:
            code, detail = issues[0]
            out.update(status=code, error=f"sample {record['id']!r}: {code}: {detail}")
            return out
        messages = normalize_conversation(raw, sample_id=record["id"])
        if plain:
            if not record.get("image"):
                out.update(status="image_tag_mismatch",
                           error=f"sample {record['id']!r}: image_tag_mismatch: no image, but a stage-1 (plain) sample captions one")
                return out
            messages = plain_caption_messages(messages)
        if messages[-1]["role"] != "assistant":
            messages = messages[:-1]
        encoded = processor.encode_conversation(messages)
    except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        out.update(status="malformed_sample", error=f"sample {record['id']!r}: malformed_sample: {err}")
        return out
    ids, labels = encoded["input_ids"], encoded["labels"]
    if len(ids) > max_length:
        ids, labels, status = _truncate(ids, labels, max_length, processor.image_token_id)
        if status != "truncated":
            out.update(status=status, error=f"sample {record['id']!r}: {status}: "
                                            f"{len(encoded['input_ids'])} tokens > max_length {max_length}")
            return out
        out["status"] = "truncated"
    out.update(input_ids=ids, labels=labels, length=len(ids))
    return out


def _truncate(ids: list[int], labels: list[int], max_length: int, image_token_id: int):
    """Cut to the end of the last answer that fits whole. Every image token must stay: a cut
    inside them, or one that leaves an image's tokens behind the end (its pixels would still be
    sent, and the batch would fail for want of placeholders), drops the sample."""
    end = max_length
    # step back to the end of a complete answer: a supervised token followed by an unsupervised one
    while end > 0 and not (labels[end - 1] != IGNORE_INDEX and (end == len(labels) or labels[end] == IGNORE_INDEX)):
        end -= 1
    if image_token_id in ids[max_length:] and image_token_id in ids[:max_length]:
        return ids, labels, "image_cut_by_max_length"
    if end == 0:
        return ids, labels, "no_complete_answer_within_max_length"
    if image_token_id in ids[end:]:
        return ids, labels, "image_beyond_max_length"
    return ids[:end], labels[:end], "truncated"


def encode_dataset(records: datasets.Dataset, source_fingerprint: str, processor: LlavaJpProcessor,
                   max_length: int, strict: bool = False) -> tuple[datasets.Dataset, DataReport]:
    """Tokenize every record once and drop the ones that cannot train, counting each reason;
    with `strict`, the first bad sample raises.

    The result is cached by `datasets` under a key made of the source, the template, the image
    token count, the tokenizer and max_length: re-runs with the same setting skip tokenization.
    """
    plain = processor.template == "plain"
    get_template(processor.template)
    vocab = processor.tokenizer.get_vocab()
    key = hashlib.sha256(json.dumps([
        ENCODING_VERSION, source_fingerprint, processor.template, processor.num_image_tokens, processor.image_token_id,
        max_length, sorted(vocab.items()), processor.tokenizer.eos_token_id, processor._special_prefix(),
    ]).encode()).hexdigest()[:16]
    cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "llava_jp_tokenized"
    cache_dir.mkdir(parents=True, exist_ok=True)
    encoded = records.map(
        encode_record, fn_kwargs={"processor": processor, "max_length": max_length, "plain": plain},
        cache_file_name=str(cache_dir / f"{key}.arrow"), new_fingerprint=key, desc="tokenizing",
    )
    report = DataReport(total=len(encoded))
    statuses = encoded["status"]
    for status, error in zip(statuses, encoded["error"]):
        if status == "truncated":
            report.truncated += 1
        elif status != "ok":
            if strict:
                raise DataError(error)
            report.dropped[status] += 1
    keep = [i for i, s in enumerate(statuses) if s in ("ok", "truncated")]
    report.kept = len(keep)
    if report.dropped or report.truncated:
        logger.warning("data: %s", report.as_dict())
    return encoded.select(keep), report


def grouped_batches(lengths: list[int], has_image: list[bool], batch_size: int, seed: int,
                    group: bool = True, megabatch_factor: int = 50) -> list[list[int]]:
    """One epoch of batches of indices, reproducible from `seed`.

    With `group`, every batch holds one modality (image or text-only) and samples of similar
    **token** length: indices are shuffled, cut into mega-batches, sorted by length inside each
    one, and the resulting batches are shuffled again.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for modality in (True, False):
        pool = [i for i in order if has_image[i] == modality]
        mega = batch_size * megabatch_factor
        for start in range(0, len(pool), mega):
            chunk = sorted(pool[start:start + mega], key=lambda i: -lengths[i])
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


class Collator:
    """Indices -> a padded training batch with pixel values for the samples that have images
    (or, with a `feature_cache`, their cached vision features as `image_features`).

    Images are opened here, lazily. A sample whose image cannot be used is left out of the
    batch and reported in `batch["faults"]` as `(sample id, reason, message)` (a batch also
    travels back from DataLoader workers, where counters would be lost); with `strict`, it
    raises `DataError` naming the sample. When every sample of a batch is bad, the batch holds
    one fully masked row (no supervised tokens, a blank image): every process still runs its
    forward and backward pass, so DDP stays in step, and the gradient is zero.
    """

    def __init__(self, dataset: datasets.Dataset, processor: LlavaJpProcessor, image_folder: str,
                 strict: bool = False, feature_cache: FeatureCache | None = None):
        self.dataset = dataset
        self.processor = processor
        self.image_folder = Path(image_folder) if image_folder else None
        self.strict = strict
        self.feature_cache = feature_cache

    def image_path(self, relative: str) -> Path:
        return self.image_folder / relative if self.image_folder else Path(relative)

    def __call__(self, indices: list[int]) -> dict:
        rows = self.dataset.select(indices)
        features, images, faults = [], [], []
        cached_images = []
        for r in rows:
            if r["image"]:
                try:
                    if self.feature_cache is not None:  # its faults are those `cache-features` met loading the file
                        self.feature_cache.check_usable(r["image"])
                        cached_images.append(r["image"])
                    else:
                        images.append(load_image(self.image_path(r["image"])))
                except ImageLoadError as err:
                    if self.strict:
                        raise DataError(f"sample {r['id']!r}: {err.reason}: {err}") from err
                    faults.append((r["id"], err.reason, str(err)))
                    continue
            features.append({"input_ids": r["input_ids"], "labels": r["labels"]})
        if not features:
            first = rows[0]
            features = [{"input_ids": first["input_ids"], "labels": [IGNORE_INDEX] * len(first["labels"])}]
            if first["image"]:
                images = [Image.new("RGB", (8, 8))]
        batch = self.processor.pad(features, padding_side="right")
        if cached_images:
            batch["image_features"] = self.feature_cache.load(cached_images)
        if images:  # one processor call per batch: the same pixels as one call per image, ~2x faster
            batch["pixel_values"] = self.processor.preprocess_images(images)
        batch["faults"] = faults
        return batch


# cap on loader workers per GPU process when `dataloader_num_workers` is unset: one worker
# (~100 images/s at 768 px) covers an H200's stage-1 demand on paper (~55 samples/s,
# docs/benchmarks.md); the rest is room for larger source images, slow disks and Python overhead
AUTO_WORKERS_PER_GPU = 8


def loader_workers(requested: int | None) -> int:
    """`requested`, or the automatic choice: on CUDA the CPU cores this process may claim
    (cores / processes on the node, less one for the training process), up to
    `AUTO_WORKERS_PER_GPU`; on CPU none (workers would take the cores the step computes on)."""
    if requested is not None:
        return requested
    if not torch.cuda.is_available():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    return max(0, min(AUTO_WORKERS_PER_GPU, cores // max(per_node, 1) - 1))


def make_loader(batches: list[list[int]], collator: Collator, cfg, seed: int = 0) -> DataLoader:
    """The training DataLoader over precomputed batches of indices: worker processes run the
    collator (image decoding and resizing) ahead of the step, with pinned memory on CUDA."""
    workers = loader_workers(cfg.dataloader_num_workers)
    extra = {}
    if workers:
        extra = {"persistent_workers": cfg.dataloader_persistent_workers, "prefetch_factor": cfg.dataloader_prefetch_factor}
    return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=collator, num_workers=workers,
                      pin_memory=cfg.dataloader_pin_memory and torch.cuda.is_available(),
                      # its own generator: creating the iterator must not draw from the global
                      # RNG, or a resumed run's dropout masks would differ from the original's
                      generator=torch.Generator().manual_seed(seed), **extra)
