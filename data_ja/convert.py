"""`convert`: turing-motors' Japanese LLaVA sets -> training format.

Both `turing-motors/LLaVA-Pretrain-JA` (English in each turn's `value`, Japanese in its `jp`)
and `turing-motors/LLaVA-v1.5-Instruct-620K-JA` are handled by one rule: in a row whose turns
carry `jp`, every turn's Japanese text is its `jp`; otherwise it is the turn's `value`. Rows
are repaired where the repair is unambiguous and dropped otherwise; every repair and drop is
counted by reason.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .conversation import (DEFAULT_MIN_JAPANESE_SHARE, IMAGE_TAG, LLAVA_ROLE, japanese_share,
                           normalize_conversation, sample_text, validate_sample)
from .records import JsonListWriter, iter_records
from llava_jp.files import write_json

# What machine translation makes of "<image>": full-width brackets, spaces, translated words.
_IMAGE_TAG_VARIANT = re.compile(r"[<＜]\s*(?:image|画像|イメージ)\s*[>＞]", re.IGNORECASE)
_MAX_EXAMPLES = 5


class Dropped(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class ConvertReport:
    rows_in: int = 0
    kept: int = 0
    fixed: int = 0
    dropped: int = 0
    fixes: Counter = field(default_factory=Counter)
    drops: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def note(self, reason: str, sample_id) -> None:
        ids = self.examples.setdefault(reason, [])
        if len(ids) < _MAX_EXAMPLES:
            ids.append(sample_id)

    def as_dict(self) -> dict:
        return {"rows_in": self.rows_in, "kept": self.kept, "fixed": self.fixed,
                "dropped": self.dropped, "fixes": dict(self.fixes), "drops": dict(self.drops),
                "examples": self.examples}


def _fix_tag_variants(text: str, fixes: list[str]) -> str:
    fixed = _IMAGE_TAG_VARIANT.sub(IMAGE_TAG, text)
    if fixed != text:
        fixes.append("image_tag_normalised")
    return fixed


def _japanese_turn_text(turn: dict, row_has_jp: bool, fixes: list[str]) -> str:
    english = turn.get("value")
    if not row_has_jp:
        if not isinstance(english, str):
            raise Dropped("malformed_sample", "a turn has no text")
        return _fix_tag_variants(english, fixes)
    text = turn.get("jp")
    if not isinstance(text, str) or not text.strip():
        raise Dropped("missing_japanese", "a turn has no 'jp' text")
    text = _fix_tag_variants(text, fixes)
    if isinstance(english, str) and english.count(IMAGE_TAG) == 1 and IMAGE_TAG not in text:
        # The translation lost the tag: put it back on the side where the English had it.
        text = (f"{text}\n{IMAGE_TAG}" if english.strip().endswith(IMAGE_TAG)
                else f"{IMAGE_TAG}\n{text}")
        fixes.append("image_tag_restored")
    return text


def convert_row(row, index: int, id_prefix: str = "row-",
                min_japanese_share: float = DEFAULT_MIN_JAPANESE_SHARE) -> tuple[dict, list[str]]:
    """One hub row -> (training sample, fixes applied). Raises Dropped."""
    if not isinstance(row, dict) or not isinstance(row.get("conversations"), list) \
            or not all(isinstance(t, dict) for t in row["conversations"]):
        raise Dropped("malformed_sample", "no list of turns in 'conversations'")
    fixes: list[str] = []
    turns = []
    row_has_jp = any(t.get("jp") is not None for t in row["conversations"])
    for turn in row["conversations"]:
        text = _japanese_turn_text(turn, row_has_jp, fixes)
        if text.strip() != text:
            text = text.strip()
            fixes.append("whitespace_trimmed")
        turns.append({"from": turn.get("from"), "value": text})
    try:
        roles = [t["role"] for t in normalize_conversation(turns)]
    except ValueError as err:
        raise Dropped("bad_role", str(err)) from err
    for turn, role in zip(turns, roles):
        if turn["from"] != LLAVA_ROLE[role]:
            turn["from"] = LLAVA_ROLE[role]
            fixes.append("role_renamed")

    sample_id = row.get("id")
    if sample_id is None or sample_id == "":
        sample_id = f"{id_prefix}{index}"
        fixes.append("id_assigned")
    sample = {"id": sample_id}
    image = row.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
        fixes.append("image_list_unwrapped")
    if image not in (None, "", []):
        sample["image"] = image
    sample["conversations"] = turns

    issues = validate_sample(sample)
    if issues:
        raise Dropped(*issues[0])
    share = japanese_share(sample_text(sample))
    if share is not None and share < min_japanese_share:
        raise Dropped("not_japanese", f"Japanese share {share:.2f}")
    return sample, sorted(set(fixes))


def convert(source: str, out: str, split: str = "train", id_prefix: str = "row-",
            min_japanese_share: float = DEFAULT_MIN_JAPANESE_SHARE) -> ConvertReport:
    """Converts every row of `source` (hub id or local file) and writes the kept ones to `out`."""
    report = ConvertReport()

    def invalid_line(line_no: int, message: str) -> None:
        report.rows_in += 1
        report.dropped += 1
        report.drops["invalid_json"] += 1
        report.note("invalid_json", f"line {line_no}")

    with JsonListWriter(out) as writer:
        rows = iter_records(source, split, on_error=invalid_line)
        for index, row in enumerate(tqdm(rows, desc="convert", unit="row")):
            report.rows_in += 1
            row_id = row.get("id") if isinstance(row, dict) else None
            try:
                sample, fixes = convert_row(row, index, id_prefix, min_japanese_share)
            except Dropped as drop:
                report.dropped += 1
                report.drops[drop.reason] += 1
                report.note(drop.reason, row_id if row_id is not None else f"row {index}")
                continue
            writer.write(sample)
            report.kept += 1
            report.fixed += bool(fixes)
            report.fixes.update(fixes)
            for fix in fixes:
                report.note(fix, sample["id"])
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="hub dataset id (e.g. turing-motors/LLaVA-Pretrain-JA) "
                        "or a local .json/.jsonl/.parquet file")
    parser.add_argument("--out", required=True, help="output JSON list (training format)")
    parser.add_argument("--report", help="write the counts as JSON here (default: OUT.report.json)")
    parser.add_argument("--split", default="train", help="hub split (default: train)")
    parser.add_argument("--id-prefix", default="row-",
                        help="ids given to id-less rows are this prefix + the row number")
    parser.add_argument("--min-japanese-share", type=float, default=DEFAULT_MIN_JAPANESE_SHARE,
                        help="drop samples whose letters are less Japanese than this")


def run(args: argparse.Namespace) -> int:
    report = convert(args.source, args.out, args.split, args.id_prefix, args.min_japanese_share)
    write_json(Path(args.report or f"{args.out}.report.json"), report.as_dict())
    print(json.dumps(report.as_dict(), ensure_ascii=False, indent=2), file=sys.stderr)
    return 0
