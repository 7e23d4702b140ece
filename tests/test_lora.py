"""LoRA / QLoRA stage 2 through PEFT: adapters on the LM, the projector trained in full and kept
in the adapter folder, exact resume after SIGKILL, merge == adapter + base, both outputs load."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_jp import LlavaJpForConditionalGeneration, LlavaJpProcessor
from llava_jp.train import checkpoint as ckpt
from llava_jp.infer.load import load_model
from llava_jp.train import lora
from llava_jp.train.config import load_config
from llava_jp.train.data import Collator, encode_dataset, load_records
from llava_jp.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
LORA = ["--lora_enable", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1", "--mm_projector_lr", "5e-4"]


def _args(ws, out, *extra):
    return ["--model", str(ws["base"]), "--data_path", str(ws["stage2"]), "--image_folder", str(ws["images"]),
            "--output_dir", str(out), "--stage", "2", "--per_device_batch_size", "8", "--learning_rate", "1e-3",
            "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--warmup_ratio", "0",
            "--max_length", "256", "--seed", "5", "--save_total_limit", "3", *LORA, *extra]


def _batch(ws, processor, n=4):
    dataset, _ = encode_dataset(*load_records(str(ws["stage2"])), processor, 256, False)
    batch = Collator(dataset, processor, str(ws["images"]))(list(range(n)))
    batch.pop("faults")
    return batch


@pytest.fixture(scope="module")
def lora_run(train_workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    cfg = load_config(None, _args(train_workspace, out, "--lora_merge", "--save_steps", "1000"))
    return out, train(cfg)


def test_lora_trains_adapters_and_the_whole_projector_not_the_lm(lora_run, train_workspace):
    out, summary = lora_run
    assert summary["steps"] == 6
    saved = load_file(out / lora.ADAPTER_SUBDIR / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and any("lora_B" in k for k in saved)
    projector = {k.split("multi_modal_projector.")[1]: v for k, v in saved.items() if "multi_modal_projector" in k}
    assert set(projector) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # the projector travels with the adapters
    assert all("vision_tower" not in k for k in saved)
    base = LlavaJpForConditionalGeneration.from_pretrained(train_workspace["base"]).state_dict()
    assert not torch.equal(projector["0.weight"], base["multi_modal_projector.0.weight"])
    config = json.loads((out / lora.ADAPTER_SUBDIR / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(train_workspace["base"].resolve())


def test_merged_model_gives_the_logits_of_adapters_on_the_base(lora_run, train_workspace):
    from peft import PeftModel

    out, _ = lora_run
    merged = LlavaJpForConditionalGeneration.from_pretrained(out / ckpt.MODEL_SUBDIR).eval()
    base = LlavaJpForConditionalGeneration.from_pretrained(train_workspace["base"])
    adapted = PeftModel.from_pretrained(base, str(out / lora.ADAPTER_SUBDIR)).eval()
    processor = LlavaJpProcessor.from_pretrained(out / lora.ADAPTER_SUBDIR)
    batch = _batch(train_workspace, processor)
    with torch.no_grad():
        a = adapted(**{k: v for k, v in batch.items() if k != "labels"}).logits
        m = merged(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(a, m, atol=1e-5, rtol=1e-5), (a - m).abs().max()
    with adapted.disable_adapter(), torch.no_grad():  # the adapters did change the outputs
        plain = adapted(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert not torch.allclose(plain, a, atol=1e-3)


def test_adapter_folder_loads_in_chat_eval_and_release(lora_run, tmp_path):
    from llava_jp.eval.runner import load_model as eval_load
    from llava_jp.hub.release import release
    from llava_jp.infer.chat import load_model as chat_load

    out, _ = lora_run
    adapter = out / lora.ADAPTER_SUBDIR
    merged = LlavaJpForConditionalGeneration.from_pretrained(out / ckpt.MODEL_SUBDIR).state_dict()
    for model, _ in (chat_load(str(adapter), device="cpu"), eval_load(str(adapter), device="cpu")):
        state = model.state_dict()
        assert all(torch.allclose(state[k], merged[k], atol=1e-6) for k in merged)
    report = release(str(adapter), tmp_path / "rel", verify=False)
    assert (tmp_path / "rel" / "config.json").exists() and report


def test_sigkill_then_resume_matches_an_uninterrupted_lora_run(train_workspace, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "llava_jp.cli", "train"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cli + _args(train_workspace, full), check=True, env=env, capture_output=True)
    crash = subprocess.run([sys.executable, "-m", "tests.fakes.crash", "train", *_args(train_workspace, killed)],
                           env={**env, "LLAVA_JP_KILL_AFTER_CHECKPOINT": "4"}, capture_output=True)
    assert crash.returncode == -signal.SIGKILL and not (killed / "summary.json").exists()
    assert [p.name for p in ckpt.complete_checkpoints(killed)] == ["checkpoint-2", "checkpoint-4"]
    subprocess.run(cli + _args(train_workspace, killed) + ["--resume"], check=True, env=env, capture_output=True)
    reference = {json.loads(l)["step"]: json.loads(l)["loss"] for l in (full / "log.jsonl").read_text().splitlines()}
    resumed = {json.loads(l)["step"]: json.loads(l)["loss"] for l in (killed / "log.jsonl").read_text().splitlines()}
    assert resumed == reference
    a = load_file(full / lora.ADAPTER_SUBDIR / "adapter_model.safetensors")
    b = load_file(killed / lora.ADAPTER_SUBDIR / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _bnb_4bit_reason() -> str | None:
    """Why 4-bit bitsandbytes cannot run here, or None when it can."""
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(16, 16, quant_type="nf4")
        layer = layer.to("cuda" if torch.cuda.is_available() else "cpu")
        layer(torch.randn(2, 16, device=layer.weight.device))
    except Exception as err:  # noqa: BLE001 -- any failure means: not supported on this device
        return f"bitsandbytes 4-bit does not run on this device: {type(err).__name__}: {err}"
    return None


def test_qlora_trains_on_a_4bit_base(train_workspace, tmp_path):
    reason = _bnb_4bit_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "q"
    cfg = load_config(None, _args(train_workspace, out, "--bits", "4", "--max_steps", "2", "--save_steps", "1000"))
    summary = train(cfg)
    assert summary["steps"] == 2 and (out / lora.ADAPTER_SUBDIR / "adapter_model.safetensors").exists()
    model, _ = load_model(out / lora.ADAPTER_SUBDIR)  # merged into the full-precision base
    assert all(p.dtype == torch.float32 for p in model.language_model.parameters())
