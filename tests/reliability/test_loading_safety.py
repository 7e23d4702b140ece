"""Item 3: weights load from safetensors; any pickle is read with `weights_only=True`; remote
code runs only where it is deliberate (the release check, in its own process). Checked on the
source (every call in the package) and by behaviour (hostile files never execute)."""

import ast
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from llava_jp import LlavaJpForConditionalGeneration, LlavaJpProcessor
from llava_jp.presets.builder import build
from llava_jp.infer.chat import load_model
from llava_jp.hub.import_v1 import _load_pickle
from llava_jp.train import checkpoint as ckpt
from llava_jp.train.loop import _resume

from tests.helpers import write_preset

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("llava_jp", "data_ja", "benchmarks")
# The only place that sets trust_remote_code: `llava-jp release` loads the folder it has just
# generated from this package's source, in a separate `python -I` process that cannot import
# llava_jp, to prove that hub users can load it (docs/release.md, docs/reliability.md).
REMOTE_CODE_ALLOWED = {("llava_jp/hub/probe.py", "_main")}


def _sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def _calls(tree):
    """(call node, name of the enclosing function) for every call in a module."""
    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                yield child, inner
            yield from walk(child, inner)

    yield from walk(tree, "<module>")


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def test_the_source_loads_no_pickle_unsafely_and_sets_trust_remote_code_only_in_the_release_probe(checked):
    torch_loads, remote_code, problems, modules = 0, set(), [], 0
    for where, tree in _sources():
        modules += 1
        load_aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                        and node.module == "torch" for a in node.names if a.name == "load"}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if _dotted(target).endswith(("MAX_IMAGE_PIXELS", "LOAD_TRUNCATED_IMAGES")) and "." in _dotted(target):
                        problems.append(f"{where}:{node.lineno}: sets {_dotted(target)} (PIL's guards stay on)")
        for call, function in _calls(tree):
            name = _dotted(call.func)
            if name == "torch.load" or name in load_aliases:
                torch_loads += 1
                if not _is_true(_keyword(call, "weights_only")):
                    problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
            if name.split(".")[-1] in ("loads", "load", "Unpickler") and name.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle"):
                problems.append(f"{where}:{call.lineno}: {name} (unpickles arbitrary objects)")
            if _is_true(_keyword(call, "allow_pickle")):
                problems.append(f"{where}:{call.lineno}: allow_pickle=True")
            use_safetensors = _keyword(call, "use_safetensors")
            if isinstance(use_safetensors, ast.Constant) and use_safetensors.value is False:
                problems.append(f"{where}:{call.lineno}: use_safetensors=False")
            if _keyword(call, "trust_remote_code") is not None:
                remote_code.add((where, function))
                if (where, function) not in REMOTE_CODE_ALLOWED:
                    problems.append(f"{where}:{call.lineno}: trust_remote_code outside the release probe")
    assert problems == []
    assert remote_code == REMOTE_CODE_ALLOWED  # the probe still exists (else update the allowance and the docs)
    # the scan sees the checkpoint and import loaders (a checkpoint's optimizer and RNG files are read by
    # accelerate's load_state, weights_only by default: test_hostile_pickles_are_refused_without_running)
    assert torch_loads >= 2
    checked("modules scanned", modules)
    checked("torch.load calls, all weights_only=True", torch_loads)


class _Payload:
    """Unpickling this runs `Path(marker).touch()`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_hostile_pickles_are_refused_without_running(tiny_dir, tmp_path, checked):
    marker = tmp_path / "pwned"
    refused = 0
    # a checkpoint's optimizer state (written by accelerate's save_state, read by its load_state)
    model = LlavaJpForConditionalGeneration.from_pretrained(tiny_dir)
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.multi_modal_projector.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run = {"strategy": "single"}
    saved = ckpt.save_checkpoint(tmp_path / "run", 1, accelerator, model, scheduler, {"run": run}, keep=1)
    torch.save({"state": {}, "param_groups": _Payload(marker)}, saved / "optimizer.bin")
    state = json.loads((saved / ckpt.STATE_FILE).read_text())
    state["files"]["optimizer.bin"] = (saved / "optimizer.bin").stat().st_size
    (saved / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(Exception, match="Weights only load failed"):
        ckpt.load_checkpoint(saved, accelerator, model, scheduler)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* could be loaded: checkpoint-1: UnpicklingError"):  # --resume stops; it does not start over
        _resume(tmp_path / "run", model, scheduler, accelerator, run)
    refused += 1
    # a predecessor checkpoint (`llava-jp import-llava-jp`)
    torch.save({"model.mm_projector.0.weight": _Payload(marker)}, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        _load_pickle(tmp_path / "mm_projector.bin")
    refused += 1
    # a model folder with pickled weights instead of safetensors (transformers reads them weights_only)
    folder = tmp_path / "pickled_model"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"lm_head.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        LlavaJpForConditionalGeneration.from_pretrained(folder)
    refused += 1
    assert not marker.exists()
    checked("hostile pickles refused, none executed", refused)


def _plant_remote_code(folder: Path, marker: Path, auto_map: dict) -> None:
    """Point `folder`'s configs at a module that touches `marker` when imported."""
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\nclass Evil: pass\n")
    for name, key in [("config.json", "AutoConfig"), ("processor_config.json", "AutoProcessor"),
                      ("tokenizer_config.json", "AutoTokenizer")]:
        path = folder / name
        if path.exists() and key in auto_map:
            data = json.loads(path.read_text())
            data["auto_map"] = {key: auto_map[key]}
            path.write_text(json.dumps(data))


def test_our_loaders_never_run_remote_code(tiny_dir, tmp_path, checked):
    marker = tmp_path / "remote_code_ran"
    auto_map = {"AutoConfig": "evil.Evil", "AutoProcessor": "evil.Evil", "AutoTokenizer": ["evil.Evil", None]}
    # a llava-jp folder that also carries remote code (as a hub release does): our classes load it
    release_like = tmp_path / "release_like"
    LlavaJpForConditionalGeneration.from_pretrained(tiny_dir).save_pretrained(release_like)
    LlavaJpProcessor.from_pretrained(tiny_dir).save_pretrained(release_like)
    _plant_remote_code(release_like, marker, auto_map)
    from transformers import AutoConfig

    loaders = {
        "LlavaJpForConditionalGeneration.from_pretrained": lambda: LlavaJpForConditionalGeneration.from_pretrained(release_like),
        "LlavaJpProcessor.from_pretrained": lambda: LlavaJpProcessor.from_pretrained(release_like),
        "chat.load_model": lambda: load_model(str(release_like), device="cpu"),
        "AutoConfig (llava-jp info)": lambda: AutoConfig.from_pretrained(release_like),
    }
    for name, load in loaders.items():
        load()
        assert not marker.exists(), name
    # a language model that only loads with its remote code: building a preset on it is refused
    lm = tmp_path / "remote_lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model_type": "evil-lm", "auto_map": auto_map}))
    _plant_remote_code(lm, marker, auto_map)
    preset = write_preset(tmp_path / "preset.yaml", language_model={"name_or_path": str(lm), "config": None})
    with pytest.raises(ValueError, match="trust_remote_code"):
        build(str(preset), pretrained=True)
    assert not marker.exists()
    checked("loaders that ignored or refused remote code", len(loaders) + 1)
