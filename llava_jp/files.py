"""The one way this project writes a file or folder that others read: into `NAME.tmp`, then one
rename onto `NAME`. A reader (or a run resumed after a kill) sees the old or the new version,
never half of one; a failed write leaves `NAME` as it was and removes the partial `NAME.tmp`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable


def replace_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` creates a file or a folder at `tmp`; it then replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    _remove(tmp)
    try:
        write(tmp)
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)  # os.replace cannot put a folder over a non-empty folder
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    """`data` into `path` atomically; `fsync` also flushes it to disk before the rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    replace_atomically(Path(path), write)


def write_text(path: Path, text: str) -> None:
    """UTF-8 `text` into `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    """`obj` as indented UTF-8 JSON (Japanese stays readable) into `path` atomically."""
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
