"""Reading rows from a hub id or a local JSON / JSONL / parquet file; writing JSON atomically."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from llava_jp.errors import UserError, loading, read_json

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def iter_records(source: str, split: str = "train",
                 on_error: Callable[[int, str], None] | None = None) -> Iterator[dict]:
    """Rows of a local .json (a list) / .jsonl / .parquet file, or of a hub dataset id.

    A JSONL line that does not parse is passed to `on_error(line_no, message)` and skipped
    when a callback is given; otherwise it raises `UserError` naming the line. A missing file
    is reported here, before the first row is asked for (and before any progress bar).
    """
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _iter_jsonl(path, on_error)
        if suffix == ".json":
            data = read_json(path)
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of samples")
            return iter(data)
        if suffix == ".parquet":
            return _iter_parquet(path)
        raise UserError(f"{path}: unsupported file type {suffix!r} (json, jsonl, parquet)")
    if _HUB_ID.match(source) and not path.exists() and path.suffix.lower() not in (".json", ".jsonl", ".parquet"):
        import datasets
        with loading(source, "dataset"):
            return iter(datasets.load_dataset(source, split=split))
    raise UserError(f"{source}: no such file, and not a hub dataset id")


def _iter_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _iter_jsonl(path: Path, on_error) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                if on_error is None:
                    raise UserError(f"{path}:{line_no}:{err.colno}: malformed JSON line: {err.msg}") from None
                on_error(line_no, str(err))


def load_records(source: str, split: str = "train") -> list[dict]:
    return list(iter_records(source, split))


class JsonListWriter:
    """Streams samples into a JSON list; the file appears only when the block exits cleanly."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = 0

    def __enter__(self) -> "JsonListWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        self._f = os.fdopen(fd, "w", encoding="utf-8")
        self._f.write("[")
        return self

    def write(self, sample: dict) -> None:
        self._f.write(",\n" if self.count else "\n")
        self._f.write(json.dumps(sample, ensure_ascii=False))
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.write("\n]\n")
        self._f.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            os.unlink(self._tmp)
