"""User mistakes as one line: the error type every subcommand raises for them, and the readers
of what users hand in (files, folders, JSON / JSONL / YAML, hub ids) that raise it.

`llava-jp` (cli.py) prints a `UserError` as one line and exits 2; any other exception is a
programming error and keeps its traceback. `UserError` is a `ValueError` so Python callers
that caught the `ValueError`s raised before keep working.
"""

from __future__ import annotations

import difflib
import json
import os
from contextlib import contextmanager
from pathlib import Path

OFFLINE_HINT = "give a local folder instead, or set HF_HUB_OFFLINE=1 to use only what is already in the cache"


class UserError(ValueError):
    """A mistake in what the user gave (a path, a file's contents, a flag, a name); the message
    names the file, line, field or flag."""


def closest(word: str, choices) -> str:
    """'; did you mean X?' for the nearest of `choices`, or '' when none is near."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when it is a file; otherwise a `UserError` naming `what` (a flag or field)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {str(path)!r}: is a folder, expected a file")
    if not p.is_file():
        raise UserError(f"{what} {str(path)!r}: no such file")
    return p


def existing_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when it is a folder; otherwise a `UserError` naming `what`."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{what} {str(path)!r}: " + ("is a file, expected a folder" if p.exists() else "no such folder"))
    return p


def parse_json(text: str, where: str):
    """JSON text; a syntax error names `where`, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None


def read_json(path: str | os.PathLike, what: str = "file"):
    """A JSON file; missing file or bad syntax -> `UserError` with the path (and line:column)."""
    p = existing_file(path, what)
    return parse_json(_read_text(p), str(p))


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list:
    """A JSON Lines file (blank lines skipped); a bad line -> `UserError` with path:line:column."""
    p = existing_file(path, what)
    rows = []
    for number, line in enumerate(_read_text(p).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{p}:{number}:{err.colno}: malformed JSON line: {err.msg}") from None
    return rows


def read_yaml(path: str | os.PathLike, what: str = "file"):
    """A YAML file; bad syntax -> `UserError` with path:line:column (1-based)."""
    import yaml

    p = existing_file(path, what)
    try:
        return yaml.safe_load(_read_text(p))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{p}{at}: malformed YAML: {problem}") from None


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        data, at = err.object, err.start
        line, col = data.count(b"\n", 0, at) + 1, at - (data.rfind(b"\n", 0, at) + 1) + 1
        raise UserError(f"{p}:{line}:{col}: not UTF-8 text (byte column)") from None


def looks_like_path(name: str) -> bool:
    """True when `name` cannot be a hub id (`org/name` or `name`), so it must be a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _hub_unreachable(err: BaseException) -> bool:
    """The exception (or one it was raised from) says the hub could not be reached or has no such id."""
    from huggingface_hub import errors as hub_errors

    kinds = tuple(getattr(hub_errors, n) for n in ("OfflineModeIsEnabled", "LocalEntryNotFoundError",
                                                    "RepositoryNotFoundError", "GatedRepoError",
                                                    "RevisionNotFoundError", "EntryNotFoundError")
                  if hasattr(hub_errors, n))
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if isinstance(err, kinds) or isinstance(err, ConnectionError) or "huggingface.co" in text \
                or "on the Hub" in text or "offline mode" in text.lower():
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def loading(name: str, what: str):
    """Around loading `name` (given as `what`, a flag or field) from a local path or the hub: a
    path that does not exist, or a hub id that cannot be reached, becomes a `UserError`."""
    if looks_like_path(str(name)) and not Path(name).exists():
        raise UserError(f"{what} {str(name)!r}: no such file or folder")
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 -- only hub / network failures are translated, the rest re-raised
        if Path(name).exists() or not _hub_unreachable(err):
            raise
        raise UserError(f"{what} {str(name)!r}: not a local folder, and the Hugging Face Hub could not serve it "
                        f"(offline, or no such repository); {OFFLINE_HINT}") from None
