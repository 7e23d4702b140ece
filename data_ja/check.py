"""`check`: validate a training file against its image folder and tokenizer before training.

Errors (the sample would crash training or be dropped by the trainer): malformed samples,
empty turns, unknown roles, wrong turn order, `<image>` count not matching the image key,
missing or unreadable images, samples whose image or first answer does not fit in
--max-length tokens. Warnings: samples the trainer truncates, text that is not Japanese, exact
duplicates, repeated ids. Token lengths and the length verdicts come from the trainer's own
encoding (`llava_jp.train.data.encode_record`); `trainer_rejects` is any other sample it would
drop. Writes report.json, summary.md and length_hist.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .conversation import (DEFAULT_MIN_JAPANESE_SHARE, image_paths, japanese_share,
                           sample_text, validate_sample)
from .records import load_records
from llava_jp.files import write_json

ERRORS = ("malformed_sample", "empty_turn", "bad_role", "bad_turn_order", "image_tag_mismatch",
          "missing_image", "corrupt_image", "too_long", "trainer_rejects")
WARNINGS = ("truncated", "not_japanese", "duplicate", "duplicate_id")


@dataclass
class Issue:
    index: int
    id: object
    kind: str
    detail: str


def find_image_issues(samples: list, image_folder: str, workers: int = 8) -> list[Issue]:
    """Every sample whose image is missing or does not decode (each file is read once)."""
    users = defaultdict(list)
    for index, sample in enumerate(samples):
        if isinstance(sample, dict) and isinstance(sample.get("image"), (str, list)):
            for path in image_paths(sample):
                if isinstance(path, str):
                    users[path].append(index)

    def problem(path: str) -> tuple[str, str] | None:
        full = Path(image_folder, path)
        if not full.is_file():
            return "missing_image", f"{path} not found"
        try:
            with Image.open(full) as image:  # the decompression-bomb guard stays on
                image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            return "corrupt_image", f"{path}: {err}"
        return None

    issues = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(problem, users)
        for path, result in tqdm(zip(users, results), total=len(users), desc="images",
                                 unit="image"):
            if result:
                issues += [Issue(i, samples[i].get("id"), *result) for i in users[path]]
    return issues


def _text_processor(tokenizer, template: str, num_image_tokens: int):
    """The core's processor, used for text only (its image processor is never called)."""
    from transformers import SiglipImageProcessor

    from llava_jp.core.processing import LlavaJpProcessor

    return LlavaJpProcessor(SiglipImageProcessor(), tokenizer, template=template,
                            num_image_tokens=num_image_tokens)


def training_length(sample: dict, processor, max_length: int) -> tuple[int, tuple | None]:
    """The sample's full token length and what the trainer would say about it at `max_length`
    (`llava_jp.train.data.encode_record`): None when it fits, else `(kind, detail)`."""
    from llava_jp.train.data import encode_record

    record = {"id": str(sample.get("id")), "image": sample.get("image"),
              "conversations": json.dumps(sample["conversations"], ensure_ascii=False)}
    plain = processor.template == "plain"
    full = encode_record(record, processor, sys.maxsize, plain)
    if full["status"] != "ok":
        return 0, ("trainer_rejects", full["error"])
    if full["length"] <= max_length:
        return full["length"], None
    verdict = encode_record(record, processor, max_length, plain)
    if verdict["status"] == "truncated":
        return full["length"], ("truncated", f"{full['length']} tokens > {max_length}: the "
                                f"trainer keeps the answers that fit ({verdict['length']} tokens)")
    return full["length"], ("too_long", f"{full['length']} tokens > {max_length}: "
                            f"{verdict['status'].replace('_', ' ')}")


def _length_stats(lengths: list[int], max_length: int) -> dict:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"count": len(ordered), "min": ordered[0], "mean": round(statistics.fmean(ordered), 1),
            "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": ordered[-1],
            "over_max_length": sum(n > max_length for n in ordered)}


def _plot_lengths(lengths: list[int], max_length: int, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=min(100, max(10, len(set(lengths)))), color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max length {max_length}")
    ax.set(xlabel="tokens per sample (text + image placeholders + template)", ylabel="samples",
           yscale="log", title=f"{len(lengths)} well-formed samples")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_dataset(samples: list, image_folder: str | None = None, tokenizer=None,
                  max_length: int = 1532, num_image_tokens: int = 729,
                  template: str = "llm-jp-v1",
                  min_japanese_share: float = DEFAULT_MIN_JAPANESE_SHARE,
                  workers: int = 8) -> tuple[list[Issue], list[int]]:
    """All issues found, and the token lengths of the well-formed samples (when a tokenizer
    is given)."""
    issues: list[Issue] = []
    well_formed = []
    seen_content, seen_ids = {}, {}
    for index, sample in enumerate(samples):
        sample_id = sample.get("id") if isinstance(sample, dict) else None
        found = validate_sample(sample)
        issues += [Issue(index, sample_id, kind, detail) for kind, detail in found]
        if not isinstance(sample, dict):
            continue
        if not found:
            well_formed.append(index)
            share = japanese_share(sample_text(sample))
            if share is not None and share < min_japanese_share:
                issues.append(Issue(index, sample_id, "not_japanese",
                                    f"Japanese share {share:.2f} < {min_japanese_share}"))
        content = json.dumps({k: v for k, v in sample.items() if k != "id"}, sort_keys=True,
                             ensure_ascii=False, default=str)
        digest = hashlib.sha1(content.encode("utf-8")).hexdigest()
        if digest in seen_content:
            issues.append(Issue(index, sample_id, "duplicate",
                                f"same content as sample {seen_content[digest]}"))
        seen_content.setdefault(digest, index)
        if sample_id is not None:
            key = json.dumps(sample_id, default=str)
            if key in seen_ids:
                issues.append(Issue(index, sample_id, "duplicate_id",
                                    f"id also used by sample {seen_ids[key]}"))
            seen_ids.setdefault(key, index)
    if image_folder is not None:
        issues += find_image_issues(samples, image_folder, workers)
    lengths = []
    if tokenizer is not None:
        processor = _text_processor(tokenizer, template, num_image_tokens)
        for index in tqdm(well_formed, desc="tokenize", unit="sample"):
            length, found = training_length(samples[index], processor, max_length)
            if length:
                lengths.append(length)
            if found:
                issues.append(Issue(index, samples[index].get("id"), *found))
    issues.sort(key=lambda issue: (issue.index, issue.kind))
    return issues, lengths


def _summary_markdown(report: dict) -> str:
    verdict = "OK: nothing would break training" if report["ok"] else \
        "NOT OK: fix the errors below before training"
    lines = [f"# Data check: {report['data']}", "", f"**{verdict}** — {report['samples']} samples.",
             "", "| level | kind | samples | examples (id) |", "|---|---|---|---|"]
    for level, kinds in (("error", ERRORS), ("warning", WARNINGS)):
        for kind in kinds:
            count = report[f"{level}s"].get(kind, 0)
            examples = [str(i["id"]) for i in report["issues"] if i["kind"] == kind][:5]
            lines.append(f"| {level} | {kind} | {count} | {', '.join(examples)} |")
    stats = report["token_lengths"]
    if stats.get("count"):
        lines += ["", f"## Token lengths (max length {report['max_length']})", "",
                  "| " + " | ".join(stats) + " |", "|" + "---|" * len(stats),
                  "| " + " | ".join(str(v) for v in stats.values()) + " |",
                  "", "![length histogram](length_hist.png)"]
    elif report["tokenizer"] is None:
        lines += ["", "Token lengths not checked (no --tokenizer)."]
    if report["image_folder"] is None:
        lines += ["", "Images not checked (no --image-folder)."]
    return "\n".join(lines) + "\n"


def write_reports(data: str, samples: list, issues: list[Issue], lengths: list[int],
                  out_dir: str, image_folder, tokenizer_path, max_length: int,
                  max_listed: int = 1000) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = Counter(issue.kind for issue in issues)
    listed, per_kind = [], Counter()
    for issue in issues:
        per_kind[issue.kind] += 1
        if per_kind[issue.kind] <= max_listed:
            listed.append(asdict(issue))
    report = {
        "data": data, "samples": len(samples), "image_folder": image_folder,
        "tokenizer": tokenizer_path, "max_length": max_length,
        "ok": not any(counts[k] for k in ERRORS),
        "errors": {k: counts[k] for k in ERRORS if counts[k]},
        "warnings": {k: counts[k] for k in WARNINGS if counts[k]},
        "samples_with_errors": len({i.index for i in issues if i.kind in ERRORS}),
        "token_lengths": _length_stats(lengths, max_length),
        "issues": listed,
    }
    write_json(out / "report.json", report)
    (out / "summary.md").write_text(_summary_markdown(report), encoding="utf-8")
    if lengths:
        _plot_lengths(lengths, max_length, out / "length_hist.png")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="training file (.json/.jsonl/.parquet) or hub id")
    parser.add_argument("--image-folder", help="root the 'image' paths are relative to")
    parser.add_argument("--tokenizer", help="tokenizer path or hub id (AutoTokenizer)")
    parser.add_argument("--max-length", type=int, default=1532)
    parser.add_argument("--num-image-tokens", type=int, default=729,
                        help="placeholder tokens per image (729 for SigLIP-384, S2 or not)")
    parser.add_argument("--template", default="llm-jp-v1",
                        help="prompt template the data trains with: llm-jp-v1 (stage 2) or plain "
                        "(stage 1)")
    parser.add_argument("--min-japanese-share", type=float, default=DEFAULT_MIN_JAPANESE_SHARE)
    parser.add_argument("--out-dir", help="where reports go (default: DATA.check)")
    parser.add_argument("--workers", type=int, default=8, help="threads decoding images")
    parser.add_argument("--max-listed", type=int, default=1000,
                        help="issues listed per kind in report.json (counts are always exact)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when any error (not warning) is found")


def run(args: argparse.Namespace) -> int:
    samples = load_records(args.data)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    issues, lengths = check_dataset(samples, args.image_folder, tokenizer, args.max_length,
                                    args.num_image_tokens, args.template,
                                    args.min_japanese_share, args.workers)
    out_dir = args.out_dir or f"{args.data}.check"
    report = write_reports(args.data, samples, issues, lengths, out_dir, args.image_folder,
                           args.tokenizer, args.max_length, args.max_listed)
    print(_summary_markdown(report), file=sys.stderr)
    return 1 if args.strict and not report["ok"] else 0
