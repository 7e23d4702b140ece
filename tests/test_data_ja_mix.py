"""`data_ja mix`: per-source sampling, seeded, with a manifest of where every row came from."""

import json

import pytest
import yaml

from data_ja.cli import main
from data_ja.mix import parse_config


def _rows(prefix, n):
    return [{"id": f"{prefix}{i}", "image": f"{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\n説明して"}, {"from": "gpt", "value": f"{prefix}{i}"}]}
        for i in range(n)]


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_rows("a", 10)), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("b", 40)),
                                      encoding="utf-8")
    return tmp_path


def _mix(directory, config, name="mix"):
    config_path = directory / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = directory / f"{name}.json"
    assert main(["mix", str(config_path), "--out", str(out)]) == 0
    manifest = json.loads((directory / f"{name}.json.manifest.json").read_text(encoding="utf-8"))
    return json.loads(out.read_text(encoding="utf-8")), manifest


def test_each_sampling_mode_and_the_manifest(sources):
    config = {"seed": 7, "sources": [
        {"path": "a.json", "first": 3, "image_prefix": "pretrain/"},
        {"path": "b.jsonl", "name": "b_random", "random": 5},
        {"path": "b.jsonl", "name": "b_percent", "percent": 25},
        {"path": "a.json", "name": "a_all", "sample": "all"},
    ]}
    rows, manifest = _mix(sources, config)
    assert [r["id"] for r in rows[:3]] == ["a0", "a1", "a2"]
    assert rows[0]["image"] == "pretrain/0.jpg"
    assert len(rows) == 3 + 5 + 10 + 10 and manifest["total"] == len(rows)
    entries = {e["name"]: e for e in manifest["sources"]}
    assert entries["a"]["source_rows"] == {"range": [0, 3]}
    assert entries["a_all"]["source_rows"] == {"range": [0, 10]}
    assert entries["b_percent"]["selected"] == 10 and entries["b_percent"]["rows_in_source"] == 40
    # Provenance: output rows [start, end) are exactly the listed source rows, in order.
    for entry in manifest["sources"]:
        start, end = entry["output_rows"]
        picked = entry["source_rows"]
        picked = list(range(*picked["range"])) if isinstance(picked, dict) else picked
        prefix = "a" if entry["path"].endswith("a.json") else "b"
        assert [r["id"] for r in rows[start:end]] == [f"{prefix}{i}" for i in picked]
    assert entries["b_random"]["source_rows"] == sorted(entries["b_random"]["source_rows"])
    assert entries["a"]["sha256"] and len(entries["a"]["sha256"]) == 64


def test_random_sampling_is_seeded(sources):
    def pick(seed, name):
        _, manifest = _mix(sources, {"seed": seed, "sources": [
            {"path": "b.jsonl", "name": "b", "random": 8}]}, name)
        return manifest["sources"][0]["source_rows"]

    assert pick(1, "x") == pick(1, "y")
    assert pick(1, "x") != pick(2, "z")


@pytest.mark.parametrize("config, message", [
    ({}, "non-empty list 'sources'"),
    ({"sources": [{"name": "x"}]}, r"sources\[0\].path is required"),
    ({"sources": [{"path": "a.json", "first": 2, "random": 3}]}, "only one of"),
    ({"sources": [{"path": "a.json", "percent": 150}]}, r"sources\[0\].percent must be"),
    ({"sources": [{"path": "a.json", "random": "ten"}]}, r"sources\[0\].random must be an integer"),
    ({"sources": [{"path": "a.json", "frist": 2}]}, r"unknown key\(s\) \['frist'\]"),
    ({"sources": [{"path": "a.json"}, {"path": "b/a.json"}]}, "'a' is used twice"),
    ({"seed": "x", "sources": [{"path": "a.json"}]}, "seed must be an integer"),
])
def test_config_errors_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        parse_config(config)


def test_data_commands_route_under_a_parent_command(sources):
    """`llava-jp data mix ...`: the core's CLI adds data_ja.cli's arguments under `data`."""
    import argparse

    from data_ja import cli

    parent = argparse.ArgumentParser(prog="llava-jp")
    cli.add_arguments(parent.add_subparsers(dest="command").add_parser("data"))
    config = sources / "one.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"path": "a.json", "first": 2}]}), "utf-8")
    args = parent.parse_args(["data", "mix", str(config), "--out", str(sources / "one.json")])
    assert cli.run(args) == 0
    assert len(json.loads((sources / "one.json").read_text(encoding="utf-8"))) == 2
