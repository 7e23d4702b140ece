"""`llava-jp release`: a hub-ready folder that loads with plain transformers, checked before upload.

The folder holds safetensors weights (sharded above `--max-shard-size`), config.json with an
`auto_map` (AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor), the tokenizer
(with `<image>`), the processor config (image processor nested), the chat template,
generation_config.json, README.md, and llava_jp/core/'s modules as the remote code, copied by
transformers' own `save_pretrained` (one source of truth). A fresh Python process that
cannot import llava_jp then loads the folder through the Auto classes with
`trust_remote_code=True` and must reproduce the source model's greedy tokens and logits
exactly (fp32, CPU). `--push` uploads only after that check passes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from llava_jp import __version__
from llava_jp.hub import probe as release_probe
from llava_jp.presets.builder import count_parameters
from llava_jp.hub.card import CardInfo, load_scores, render_model_card
from llava_jp.core.configuration import LlavaJpConfig
from llava_jp.core.modeling import LlavaJpForConditionalGeneration
from llava_jp.core.processing import LlavaJpProcessor
from llava_jp.core.templates import IMAGE_MARKER, get_template
from llava_jp.infer.load import load_model, save_model
from llava_jp.errors import UserError, existing_dir

AUTO_MAP = {
    "AutoConfig": "configuration.LlavaJpConfig",
    "AutoModel": "modeling.LlavaJpModel",
    "AutoModelForImageTextToText": "modeling.LlavaJpForConditionalGeneration",
    "AutoProcessor": "processing.LlavaJpProcessor",
}
# every module of llava_jp/core/ but its __init__: what transformers copies next to the weights
REMOTE_CODE = ("configuration.py", "modeling.py", "processing.py", "projector.py", "templates.py", "vision.py",
               "vllm_compat.py")
PROBE_QUESTION = "この画像について説明してください。"


class ReleaseError(RuntimeError):
    """A release step failed; the message says what and what to do."""


# -- remote code ---------------------------------------------------------------------------
@contextlib.contextmanager
def _registered_for_auto_classes():
    """Register the core classes for their Auto classes only while the release is written: a
    registration is process-wide and would make every later `save_pretrained` ship code."""
    classes = {LlavaJpConfig: "AutoConfig", LlavaJpForConditionalGeneration: "AutoModelForImageTextToText",
               LlavaJpProcessor: "AutoProcessor"}
    for cls, auto_class in classes.items():
        cls.register_for_auto_class(auto_class)
    try:
        yield
    finally:
        for cls in classes:
            cls._auto_class = None


def save_release_files(model: LlavaJpForConditionalGeneration, processor: LlavaJpProcessor, out: Path,
                       max_shard_size: str | int = "5GB") -> None:
    """Weights, configs, tokenizer and llava_jp/core/ as remote code, through transformers' own
    mechanism (`register_for_auto_class` + `save_pretrained` copy each class's module and its
    relative imports, and write `auto_map`). transformers maps one Auto class per class, so the
    base model's `AutoModel` entry is added to the same `auto_map` by hand."""
    model.config.auto_map = {"AutoModel": AUTO_MAP["AutoModel"]}
    try:
        with _registered_for_auto_classes():
            save_model(model, processor, out, model.dtype, max_shard_size=max_shard_size)
    finally:
        model.config.auto_map = None
    missing = [name for name in REMOTE_CODE if not (out / name).exists()]
    written = {**json.loads((out / "config.json").read_text(encoding="utf-8")).get("auto_map", {}),
               **json.loads((out / "processor_config.json").read_text(encoding="utf-8")).get("auto_map", {})}
    if missing or written != AUTO_MAP:
        raise ReleaseError(f"transformers did not write the remote code as expected: missing {missing}, "
                           f"auto_map {written}")


# -- card ----------------------------------------------------------------------------------
def _hub_id(name: str | None) -> str | None:
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def model_summary(model: LlavaJpForConditionalGeneration, processor: LlavaJpProcessor) -> dict:
    """What the card shows about the architecture and the prompt format."""
    config = model.config
    counts = count_parameters(model=model)
    question = [{"role": "user", "content": IMAGE_MARKER + "\n{question}"}]
    prompt = get_template(processor.template).render(question, processor.tokenizer.eos_token, add_generation_prompt=True)
    return {
        "template": processor.template,
        "prompt_example": prompt.replace("\n", "\\n"),
        "vision": _hub_id(config.vision_config._name_or_path) or config.vision_config.model_type,
        "vision_feature_layer": config.vision_feature_layer,
        "language_model": _hub_id(config.text_config._name_or_path) or config.text_config.model_type,
        "projector": config.projector_type,
        "vision_layout": config.vision_layout,
        **{k: counts[k] for k in ("total_human", "image_tokens_per_image", "projector_input_width", "image_size", "s2_scales")},
    }


def default_base_models(model: LlavaJpForConditionalGeneration) -> list[str]:
    """Hub ids the vision tower and LM were loaded from (local paths are not base models)."""
    names = [model.config.vision_config._name_or_path, model.config.text_config._name_or_path]
    return [n for n in map(_hub_id, names) if n]


# -- verification --------------------------------------------------------------------------
def probe_image(size: int) -> Image.Image:
    """A deterministic image with colour gradients and shapes at every scale."""
    image = Image.merge("RGB", [Image.linear_gradient("L"), Image.radial_gradient("L"),
                                Image.linear_gradient("L").rotate(90)]).resize((size, size))
    draw = ImageDraw.Draw(image)
    draw.rectangle([size // 8, size // 8, size // 2, size // 3], fill=(230, 20, 20))
    draw.ellipse([size // 2, size // 2, size - size // 8, size - size // 6], fill=(20, 60, 220))
    return image


# float32 rounding between two processes (seen: 3e-7 for a bf16-trained model saved in float32);
# any real difference (a lost weight, another preprocessing) is orders of magnitude larger
LOGIT_TOLERANCE = 1e-5


def verify_release(source: str | Path, release_dir: str | Path, max_new_tokens: int = 8, timeout: float = 3600) -> dict:
    """Load `release_dir` in a process that cannot import llava_jp and compare its greedy
    generation and logits on a probe image with the source model's (fp32, CPU)."""
    model, processor = load_model(source, dtype=torch.float32)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        image_path = str(Path(tmp) / "probe.png")
        probe_image(model.config.image_size).save(image_path)
        expected = release_probe.probe(model, processor, image_path, PROBE_QUESTION, max_new_tokens)
        del model  # the child loads its own copy; at full size two fp32 copies are 15 GB
        out = Path(tmp) / "release.safetensors"
        command = [sys.executable, "-I", release_probe.__file__, str(release_dir), image_path, PROBE_QUESTION,
                   str(max_new_tokens), str(out)]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            raise ReleaseError(f"the release folder did not load without llava-jp:\n{done.stderr[-4000:]}")
        loaded = json.loads(done.stdout.strip().splitlines()[-1])
        got = load_file(out)
    same_prompt = torch.equal(expected["prompt_ids"], got["prompt_ids"])
    same_tokens = torch.equal(expected["tokens"], got["tokens"])
    diff = (expected["logits"] - got["logits"]).abs().max().item() if expected["logits"].shape == got["logits"].shape else float("inf")
    idioms_hold = bool(loaded["idioms"]) and all(loaded["idioms"].values())
    return {
        "passed": same_prompt and same_tokens and diff <= LOGIT_TOLERANCE and not loaded["llava_jp_imported"] and idioms_hold
        and not loaded["deprecation_warnings"],
        "same_prompt_ids": same_prompt,
        "same_tokens": same_tokens,
        "tokens": int(expected["tokens"].numel()),
        "max_abs_logit_diff": diff,
        "source_tokens": expected["tokens"].tolist(),
        "release_tokens": got["tokens"].tolist(),
        **loaded,
    }


# -- push ----------------------------------------------------------------------------------
def push_release(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the hub repository if needed and upload the folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"llava-jp {__version__} release")
    except Exception as error:  # network, auth and hub errors all end the same way for the user
        raise ReleaseError(
            f"could not push to https://huggingface.co/{repo_id}: {type(error).__name__}: {error}\n"
            f"Everything is written in {folder}. Check the network and your login (`hf auth login` or HF_TOKEN), "
            f"then upload it with `hf upload {repo_id} {folder}`."
        ) from error
    return str(getattr(commit, "commit_url", commit))


# -- the release ---------------------------------------------------------------------------
def release(
    model_dir: str | Path,
    out: str | Path,
    *,
    repo_id: str | None = None,
    push: bool = False,
    private: bool = False,
    scores: str | Path | dict | None = None,
    license: str = "apache-2.0",
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    max_shard_size: str | int = "5GB",
    verify: bool = True,
    max_new_tokens: int = 8,
) -> dict:
    """Write the release folder, verify it, write the card, then push if asked. Returns a report."""
    out = Path(out)
    if push and not repo_id:
        raise UserError("--push needs --repo-id ORG/NAME")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {str(out)!r}: is not empty; release into a new or empty directory")
    existing_dir(model_dir, "--model")
    if isinstance(scores, (str, Path)):
        scores = load_scores(scores)
    model, processor = load_model(model_dir, dtype="saved")  # the release keeps the dtype the model was saved in
    out.mkdir(parents=True, exist_ok=True)
    save_release_files(model, processor, out, max_shard_size)
    summary = model_summary(model, processor)
    base_models = list(base_models) if base_models else default_base_models(model)
    del model  # verification loads fp32 copies; keep at most one in memory at a time
    report: dict = {"out": str(out)}
    if verify:
        report["verification"] = verify_release(model_dir, out, max_new_tokens=max_new_tokens)
        if not report["verification"]["passed"]:
            raise ReleaseError(f"the release does not reproduce the source model: {json.dumps(report['verification'])}")
    card = CardInfo(
        model=summary,
        repo_id=repo_id,
        license=license,
        base_models=base_models,
        datasets=list(datasets or []),
        scores=scores,
        verification=report.get("verification"),
        versions={"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]},
    )
    (out / "README.md").write_text(render_model_card(card), encoding="utf-8")
    report["files"] = sorted(p.name for p in out.iterdir())
    if push:
        report["pushed"] = push_release(out, repo_id, private)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved model directory (model + processor)")
    parser.add_argument("--out", required=True, help="new or empty directory for the release")
    parser.add_argument("--repo-id", help="hub repository ORG/NAME (used in the card; needed for --push)")
    parser.add_argument("--push", action="store_true", help="upload to the hub after the release is verified")
    parser.add_argument("--private", action="store_true", help="create the hub repository as private")
    parser.add_argument("--scores", help='eval scores.json: {"task": {"metric": number}} -> evaluation table')
    parser.add_argument("--license", default="apache-2.0", help="license id for the card (default apache-2.0)")
    parser.add_argument("--base-model", action="append", dest="base_models",
                        help="base model hub id (repeatable; default: the vision tower's and LM's hub ids)")
    parser.add_argument("--dataset", action="append", dest="datasets", help="training dataset hub id (repeatable)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated by the verification probe")
    parser.add_argument("--skip-verify", action="store_true", help="do not run the loading check (not recommended)")


def run(args: argparse.Namespace) -> int:
    try:
        report = release(
            args.model, args.out, repo_id=args.repo_id, push=args.push, private=args.private, scores=args.scores,
            license=args.license, base_models=args.base_models, datasets=args.datasets,
            max_shard_size=args.max_shard_size, verify=not args.skip_verify, max_new_tokens=args.max_new_tokens,
        )
    except ReleaseError as error:
        print(f"llava-jp release: {error}", file=sys.stderr)
        return 1
    verification = report.get("verification")
    if verification:
        print(f"verified: loaded without llava-jp as {verification['model_class']}; "
              f"{verification['tokens']} greedy tokens identical, max |logit diff| = {verification['max_abs_logit_diff']}")
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0
