"""Which model an eval output folder belongs to.

`llava-jp eval` resumes by reusing the predictions already in `--out`; without knowing whose
they are, a run of model B in model A's folder would report A's answers as B's. The folder
records a fingerprint of what decides the answers: the model's files (weights, config,
processor, tokenizer) by content, and the generation settings. A run with another fingerprint
is refused, naming both models.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llava_jp.files import write_json

FINGERPRINT_FILE = "model.json"
MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".jinja", ".model", ".txt", ".py")
EVAL_FILES = (FINGERPRINT_FILE, "scores.json")  # when --out is the model folder itself


class OtherModelsOutput(ValueError):
    """`--out` holds another model's predictions."""


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_files(name_or_path: str | Path) -> Path:
    """The folder holding a model's files: a local directory, or a hub id's local snapshot."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), local_files_only=True))


def model_fingerprint(name_or_path: str | Path, generation: dict) -> dict:
    """{"model", "fingerprint", "generation"}: a hash over the model's files (weights, configs,
    processor, tokenizer, remote code: name and content) and the generation settings."""
    try:
        root = model_files(name_or_path)
    except Exception:  # noqa: BLE001 -- no local files (a generate function not backed by a folder): the name stands in
        root = None
    digest = hashlib.sha256()
    if root is None:
        digest.update(f"name:{name_or_path}\n".encode())
    else:
        for path in sorted(p for p in root.iterdir()
                           if p.is_file() and p.suffix in MODEL_SUFFIXES and p.name not in EVAL_FILES):
            digest.update(f"{path.relative_to(root).as_posix()}\0{_file_digest(path)}\n".encode())
    digest.update(json.dumps(generation, sort_keys=True).encode())
    return {"model": str(name_or_path), "fingerprint": digest.hexdigest()[:16], "generation": generation,
            "by": "name" if root is None else "files"}


def claim_out_dir(out_dir: Path, fingerprint: dict) -> None:
    """Record `fingerprint` in `out_dir`, or refuse when the folder holds another model's outputs
    (or predictions of a model it cannot name)."""
    record = out_dir / FINGERPRINT_FILE
    if record.exists():
        earlier = json.loads(record.read_text(encoding="utf-8"))
        if earlier.get("fingerprint") != fingerprint["fingerprint"]:
            raise OtherModelsOutput(
                f"--out {out_dir} holds the outputs of model {earlier.get('model')!r} "
                f"(fingerprint {earlier.get('fingerprint')}, generation {earlier.get('generation')}); this run's model "
                f"{fingerprint['model']!r} has fingerprint {fingerprint['fingerprint']} (generation "
                f"{fingerprint['generation']}): use another --out, or delete the folder to start over")
        return
    predictions = out_dir / "predictions"
    if predictions.is_dir() and any(predictions.iterdir()):
        raise OtherModelsOutput(f"--out {out_dir} holds predictions of an unrecorded model (no {FINGERPRINT_FILE}); "
                                f"use another --out, or delete {predictions} to start over")
    write_json(record, fingerprint)
