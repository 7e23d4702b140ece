"""`mix`: one training file from several sources, with a manifest of what came from where.

Config (YAML)::

    seed: 0                      # default seed for random sampling
    sources:
      - path: pretrain_ja.json   # local file (relative to this YAML) or hub dataset id
        name: pretrain           # default: the file name without extension
      - path: instruct_ja.json
        random: 50000            # or: first: N | percent: P | sample: all (the default)
        seed: 1                  # optional, overrides the global seed
        image_prefix: coco/      # optional, prepended to this source's image paths
        split: train             # hub split (default: train)

Random picks keep the source order; the output is the sources concatenated in config order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path


from llava_jp.errors import UserError, read_yaml

from .records import JsonListWriter, load_records
from llava_jp.files import write_json

_MODES = ("first", "random", "percent")


@dataclass
class Source:
    name: str
    path: str
    mode: str  # all | first | random | percent
    amount: float | None
    seed: int
    image_prefix: str
    split: str


def _positive(value, field: str, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
            or (maximum is not None and value > maximum):
        limit = f" and at most {maximum}" if maximum is not None else ""
        raise UserError(f"{field} must be a positive number{limit}, got {value!r}")
    return value


def parse_config(config: dict, base_dir: Path = Path(".")) -> list[Source]:
    """Validates the YAML mapping; errors name the offending field."""
    if not isinstance(config, dict) or not isinstance(config.get("sources"), list) \
            or not config["sources"]:
        raise UserError("config needs a non-empty list 'sources'")
    default_seed = config.get("seed", 0)
    if not isinstance(default_seed, int):
        raise UserError(f"seed must be an integer, got {default_seed!r}")
    unknown = set(config) - {"seed", "sources"}
    if unknown:
        raise UserError(f"unknown top-level key(s): {sorted(unknown)}")
    sources, names = [], set()
    for i, entry in enumerate(config["sources"]):
        where = f"sources[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise UserError(f"{where}.path is required (a file or hub dataset id)")
        unknown = set(entry) - {"path", "name", "sample", "seed", "image_prefix", "split", *_MODES}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {sorted(unknown)}")
        modes = [m for m in _MODES if m in entry]
        if len(modes) > 1 or (modes and "sample" in entry):
            raise UserError(f"{where}: give only one of sample/first/random/percent")
        if "sample" in entry and entry["sample"] != "all":
            raise UserError(f"{where}.sample: only 'all' is allowed, got {entry['sample']!r}")
        mode = modes[0] if modes else "all"
        amount = None
        if mode == "percent":
            amount = _positive(entry["percent"], f"{where}.percent", 100)
        elif mode != "all":
            amount = entry[mode]
            if not isinstance(amount, int):
                raise UserError(f"{where}.{mode} must be an integer, got {amount!r}")
            _positive(amount, f"{where}.{mode}")
        name = entry.get("name") or Path(entry["path"]).stem
        if name in names:
            raise UserError(f"{where}.name {name!r} is used twice")
        names.add(name)
        seed = entry.get("seed", default_seed)
        if not isinstance(seed, int):
            raise UserError(f"{where}.seed must be an integer, got {seed!r}")
        local = base_dir / entry["path"]
        sources.append(Source(name, str(local) if local.exists() else entry["path"], mode, amount,
                              seed, entry.get("image_prefix", ""), entry.get("split", "train")))
    return sources


def select_rows(source: Source, n_rows: int) -> list[int]:
    """Row indices taken from a source of `n_rows` rows, in source order."""
    if source.mode == "all":
        return list(range(n_rows))
    if source.mode == "first":
        return list(range(min(int(source.amount), n_rows)))
    k = int(source.amount) if source.mode == "random" else round(n_rows * source.amount / 100)
    # Seeded per source name, so two sources with the same seed are not sampled alike.
    rng = random.Random(f"{source.seed}/{source.name}")
    return sorted(rng.sample(range(n_rows), min(k, n_rows)))


def _prefixed(sample: dict, prefix: str) -> dict:
    image = sample.get("image")
    if not prefix or not image:
        return sample
    new = [prefix + p for p in image] if isinstance(image, list) else prefix + image
    return {**sample, "image": new}


def _compact(rows: list[int]) -> dict | list[int]:
    if rows == list(range(len(rows))):
        return {"range": [0, len(rows)]}
    return rows


def _sha256(path: str) -> str | None:
    if not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_mixture(config_path: str, out: str, manifest_path: str) -> dict:
    """Writes the mixture and its manifest; returns the manifest."""
    config = read_yaml(config_path, "config")
    sources = parse_config(config, Path(config_path).parent)
    entries = []
    with JsonListWriter(out) as writer:
        for source in sources:
            rows = load_records(source.path, source.split)
            chosen = select_rows(source, len(rows))
            start = writer.count
            for index in chosen:
                writer.write(_prefixed(rows[index], source.image_prefix))
            entries.append({
                "name": source.name, "path": source.path, "split": source.split,
                "mode": source.mode, "requested": source.amount, "seed": source.seed,
                "image_prefix": source.image_prefix, "rows_in_source": len(rows),
                "selected": len(chosen), "output_rows": [start, writer.count],
                "source_rows": _compact(chosen), "sha256": _sha256(source.path)})
    manifest = {"config": str(config_path), "output": str(out), "total": writer.count,
                "sources": entries}
    write_json(Path(manifest_path), manifest)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML list of sources (see data_ja/README.md)")
    parser.add_argument("--out", required=True, help="output JSON list")
    parser.add_argument("--manifest", help="provenance JSON (default: OUT.manifest.json)")


def run(args: argparse.Namespace) -> int:
    manifest = build_mixture(args.config, args.out, args.manifest or f"{args.out}.manifest.json")
    summary = {s["name"]: f"{s['selected']}/{s['rows_in_source']}" for s in manifest["sources"]}
    print(json.dumps({"total": manifest["total"], "selected": summary}, indent=2),
          file=sys.stderr)
    return 0
