"""Append-only JSONL files that survive being killed mid-write (predictions, judge cache)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """All complete records in ``path`` (none if absent).

    A run killed mid-write leaves a partial last line; it is cut off here so the next append
    starts on a fresh line instead of gluing onto the fragment.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]


def append_records(path: Path, records: Iterable[dict]) -> None:
    """Append ``records`` as lines and flush them to disk before returning."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())
