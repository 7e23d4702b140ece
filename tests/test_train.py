import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_jp import LlavaJpForConditionalGeneration
from llava_jp.train import checkpoint as ckpt
from llava_jp.train.config import load_config
from llava_jp.train.data import encode_dataset, grouped_batches, load_records
from llava_jp.train.loop import setup_model, train
from llava_jp.train.optim import build_optimizer


@pytest.fixture(scope="module")
def workspace(train_workspace):
    return train_workspace


def _cfg(ws, out, **kw):
    values = dict(model=str(ws["base"]), image_folder=str(ws["images"]), data_path=str(ws["mixed"]),
                  output_dir=str(out), per_device_batch_size=8, learning_rate=1e-3, logging_steps=1,
                  save_steps=1000, warmup_ratio=0.0, max_length=256, seed=3)
    values.update(kw)
    return load_config(None, **values)


def _losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_stage1_saves_only_the_projector_and_stage2_starts_from_it(workspace, tmp_path):
    s1 = train(_cfg(workspace, tmp_path / "s1", stage=1, template="plain", data_path=str(workspace["stage1"]), max_steps=2))
    weights = load_file(s1["output"])
    assert set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    cfg2 = _cfg(workspace, tmp_path / "s2", stage=2, pretrained_projector=s1["output"], max_steps=1)
    model, _ = setup_model(cfg2)
    for k, v in weights.items():
        assert torch.equal(model.multi_modal_projector.state_dict()[k], v)
    s2 = train(cfg2)
    reloaded = LlavaJpForConditionalGeneration.from_pretrained(s2["output"])
    assert reloaded.num_image_tokens == 16


def test_frozen_parameters_get_no_gradient_and_do_not_change(workspace, tmp_path):
    cfg = _cfg(workspace, tmp_path, stage=1, template="plain", data_path=str(workspace["stage1"]), max_steps=2)
    base = LlavaJpForConditionalGeneration.from_pretrained(workspace["base"])
    train(cfg)
    before = base.state_dict()
    # stage 1 keeps everything but the projector: compare the trained projector only changed
    trained = load_file(tmp_path / "projector.safetensors")
    assert any(not torch.equal(before[f"multi_modal_projector.{k}"], v) for k, v in trained.items())
    model, _ = setup_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"multi_modal_projector.{k}" for k in trained}


def test_stage2_trains_lm_not_vision(workspace, tmp_path):
    cfg = _cfg(workspace, tmp_path, stage=2, max_steps=2, save_steps=1)
    train(cfg)
    saved = load_file(ckpt.complete_checkpoints(tmp_path)[-1] / "trainable.safetensors")
    assert any(k.startswith("language_model.") for k in saved)
    assert not any(k.startswith("vision_tower.") for k in saved)
    trained = LlavaJpForConditionalGeneration.from_pretrained(tmp_path / "model")
    base = LlavaJpForConditionalGeneration.from_pretrained(workspace["base"])
    for (name, p), q in zip(base.vision_tower.named_parameters(), trained.vision_tower.parameters()):
        assert torch.equal(p, q), name


def test_text_only_samples_train_without_running_the_vision_tower(workspace, tmp_path):
    rows = [r for r in json.loads(workspace["mixed"].read_text(encoding="utf-8")) if "image" not in r]
    path = tmp_path / "text.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    cfg = _cfg(workspace, tmp_path / "out", stage=2, data_path=str(path), max_steps=2)
    calls = []
    from llava_jp.train import loop
    original = loop.setup_model

    def spy(c):
        model, processor = original(c)
        model.vision_tower.embeddings.register_forward_hook(lambda *a: calls.append(1))
        return model, processor

    loop.setup_model = spy
    try:
        summary = train(cfg)
    finally:
        loop.setup_model = original
    assert summary["steps"] == 2 and calls == []
    assert all(l == l for l in _losses(tmp_path / "out"))  # finite, not NaN


def test_grouping_uses_token_lengths_not_words(workspace):
    processor = setup_model(_cfg(workspace, "unused", max_steps=1))[1]
    dataset, report = encode_dataset(*load_records(str(workspace["mixed"])), processor, 256)
    lengths = dataset["length"]
    has_image = [bool(x) for x in dataset["image"]]
    # Japanese has no spaces: every sample is one "word", yet token lengths differ
    assert len({len(json.loads(c)[1]["value"].split()) for c in dataset["conversations"]}) == 1
    assert len(set(lengths)) > 1
    batches = grouped_batches(lengths, has_image, batch_size=4, seed=0, megabatch_factor=100)
    for b in batches:
        assert len({has_image[i] for i in b}) == 1
    text_batches = [b for b in batches if not has_image[b[0]]]
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in text_batches]
    sorted_text = sorted(lengths[i] for i in range(len(lengths)) if not has_image[i])
    assert max(spans) < sorted_text[-1] - sorted_text[0]  # batches are tighter than the pool
    assert grouped_batches(lengths, has_image, 4, seed=0) == grouped_batches(lengths, has_image, 4, seed=0)


def test_adamw_8bit_keeps_embedding_state_in_32_bit(workspace):
    cfg = _cfg(workspace, "unused", stage=2, optimizer="adamw_8bit", max_steps=1)
    model, processor = setup_model(cfg)
    optimizer = build_optimizer(model, cfg)
    batch = processor(conversations=[[{"role": "user", "content": "やあ"}, {"role": "assistant", "content": "はい"}]])
    model(**batch).loss.backward()
    optimizer.step()
    emb = model.get_input_embeddings().weight
    assert optimizer.state[emb]["state1"].dtype == torch.float32
    fc = model.language_model.transformer.h[0].mlp.c_fc.weight
    assert optimizer.state[fc]["state1"].dtype == torch.uint8


def test_truncation_is_counted_and_never_cuts_an_answer(workspace):
    processor = setup_model(_cfg(workspace, "unused", max_steps=1))[1]
    records, fp = load_records(str(workspace["stage2"]))
    full, _ = encode_dataset(records, fp, processor, max_length=1024)
    limit = min(full["length"]) - 3  # every sample is too long: its last answer must go whole
    dataset, report = encode_dataset(records, fp, processor, max_length=limit)
    assert report.truncated == report.total == report.kept == len(full)
    eos = processor.tokenizer.eos_token_id
    for ids, labels, whole in zip(dataset["input_ids"], dataset["labels"], full["input_ids"]):
        assert len(ids) <= limit and labels[-1] == eos and ids[-1] == eos
        assert ids == whole[:len(ids)] and ids.count(eos) == whole.count(eos) - 1


def test_bad_conversations_are_counted_or_fail_fast(workspace, tmp_path):
    rows = json.loads(workspace["mixed"].read_text(encoding="utf-8"))[:4]
    rows.append({"id": "bad-role", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]})
    rows.append({"id": "two-images", "image": rows[0]["image"], "conversations": [
        {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "y"}]})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    processor = setup_model(_cfg(workspace, "unused", max_steps=1))[1]
    dataset, report = encode_dataset(*load_records(str(path)), processor, 256)
    assert report.dropped == {"bad_role": 1, "image_tag_mismatch": 1} and report.kept == 4
    with pytest.raises(ValueError, match="bad-role"):
        encode_dataset(*load_records(str(path)), processor, 256, strict=True)


def test_partial_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoint-4.tmp").mkdir()
    (tmp_path / "checkpoint-6").mkdir()  # no state file: a crash before completion
    good = tmp_path / "checkpoint-2"
    good.mkdir()
    (good / "a.bin").write_bytes(b"x")
    (good / ckpt.STATE_FILE).write_text(json.dumps({"step": 2, "files": ["a.bin"]}))
    assert ckpt.complete_checkpoints(tmp_path) == [good]
    (good / "a.bin").unlink()
    assert ckpt.complete_checkpoints(tmp_path) == []


def test_config_overrides_and_validation(tmp_path):
    cfg = load_config("stage2", ["--learning_rate", "1e-4", "--output_dir=runs/x", "--gradient_checkpointing", "false"])
    assert cfg.learning_rate == 1e-4 and cfg.output_dir == "runs/x" and cfg.gradient_checkpointing is False
    assert cfg.optimizer == "adamw_8bit" and cfg.per_device_batch_size * cfg.gradient_accumulation_steps == 16
    s1 = load_config("stage1")
    assert (s1.learning_rate, s1.per_device_batch_size, s1.max_length, s1.stage) == (1e-3, 32, 1532, 1)
    with pytest.raises(ValueError, match="unknown option --learning_rat; did you mean --learning_rate"):
        load_config("stage2", ["--learning_rat", "1"])
    with pytest.raises(ValueError, match="optimizer"):
        load_config("stage2", ["--optimizer", "sgd"])


def _train_cmd(ws, out, resume=False):
    args = [sys.executable, "-m", "llava_jp.cli", "train", "--model", str(ws["base"]), "--data_path", str(ws["mixed"]),
            "--image_folder", str(ws["images"]), "--output_dir", str(out), "--stage", "2", "--per_device_batch_size", "8",
            "--learning_rate", "1e-3", "--max_steps", "8", "--save_steps", "2", "--logging_steps", "1",
            "--warmup_ratio", "0", "--max_length", "256", "--seed", "5", "--save_total_limit", "3"]
    return args + (["--resume"] if resume else [])


def test_sigkill_then_resume_matches_an_uninterrupted_run(workspace, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_train_cmd(workspace, full), check=True, env=env, capture_output=True)
    reference = _losses(full)
    assert len(reference) == 8

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(workspace, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name == "checkpoint-4" for p in ckpt.complete_checkpoints(killed)):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.complete_checkpoints(killed), "no checkpoint before the kill"
    resumed_from = int(ckpt.complete_checkpoints(killed)[-1].name.split("-")[1])
    assert resumed_from < 8
    subprocess.run(_train_cmd(workspace, killed, resume=True), check=True, env=env, capture_output=True)
    losses = {}
    for line in (killed / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]  # the resumed run overwrites steps it repeats
    for step in range(resumed_from + 1, 9):
        assert losses[step] == reference[step - 1], step
    final = load_file(killed / "model" / "model.safetensors")
    ref_final = load_file(full / "model" / "model.safetensors")
    assert all(torch.equal(final[k], ref_final[k]) for k in ref_final)


def test_two_process_ddp_matches_one_process_for_the_same_global_batch(workspace, tmp_path):
    """2 CPU processes (gloo) x batch 4 vs 1 process x batch 8, with gradient accumulation."""
    args = ["--model", str(workspace["base"]), "--data_path", str(workspace["mixed"]), "--image_folder",
            str(workspace["images"]), "--stage", "2", "--learning_rate", "1e-3", "--max_steps", "4",
            "--logging_steps", "1", "--warmup_ratio", "0", "--max_length", "256", "--seed", "5",
            "--save_steps", "1000", "--gradient_accumulation_steps", "2",
            "--time_budget_s", "3600"]  # the budget check is a collective under DDP: exercised, never reached
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "llava_jp.cli", "train", *args, "--per_device_batch_size", "8",
                    "--output_dir", str(tmp_path / "one")], check=True, env=env, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    subprocess.run([*launch, "-m", "llava_jp.cli", "train", *args, "--per_device_batch_size", "4",
                    "--output_dir", str(tmp_path / "two")], check=True, env={**env, "ACCELERATE_USE_CPU": "1"},
                   capture_output=True)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5


def test_time_budget_stops_with_a_checkpoint_that_resumes(workspace, tmp_path):
    stopped = train(_cfg(workspace, tmp_path, stage=2, max_steps=4, time_budget_s=0.0))
    assert stopped["stopped_early"] and stopped["steps"] == 1 and stopped["total_steps"] == 4
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["checkpoint-1"]
    finished = train(_cfg(workspace, tmp_path, stage=2, max_steps=4), resume=True)
    assert not finished["stopped_early"] and finished["steps"] == 4
    assert [json.loads(l)["step"] for l in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def _cli_args(ws, out, *extra):
    return ["train", "--model", str(ws["base"]), "--data_path", str(ws["mixed"]), "--image_folder", str(ws["images"]),
            "--output_dir", str(out), "--stage", "2", "--per_device_batch_size", "8", "--max_steps", "2",
            "--save_steps", "1", "--logging_steps", "1", "--max_length", "256", "--seed", "5", *extra]


def test_resume_refuses_a_changed_run_and_says_what_changed(workspace, tmp_path, capsys):
    from llava_jp.cli import main

    assert main(_cli_args(workspace, tmp_path)) == 0
    capsys.readouterr()
    # same global batch (8), other accumulation: a different loss normalisation and data split per micro-batch
    changed = ["--per_device_batch_size", "4", "--gradient_accumulation_steps", "2"]
    assert main(_cli_args(workspace, tmp_path, *changed, "--resume")) == 2
    err = capsys.readouterr().err
    assert "per_device_batch_size 8 -> 4" in err and "gradient_accumulation_steps 1 -> 2" in err
    assert "--allow_resume_changes" in err and "Traceback" not in err
    assert main(_cli_args(workspace, tmp_path, *changed, "--resume", "--allow_resume_changes")) == 0


def test_resume_fails_when_the_checkpoint_misses_a_trainable_weight(workspace, tmp_path):
    train(_cfg(workspace, tmp_path, stage=2, max_steps=2, save_steps=1))
    (saved,) = ckpt.complete_checkpoints(tmp_path)
    weights = load_file(saved / ckpt.TRAINABLE_FILE)
    dropped = "multi_modal_projector.0.weight"
    del weights[dropped]
    from safetensors.torch import save_file
    save_file(weights, saved / ckpt.TRAINABLE_FILE)
    state = ckpt.read_state(saved)
    state["files"][ckpt.TRAINABLE_FILE] = (saved / ckpt.TRAINABLE_FILE).stat().st_size  # still looks complete
    (saved / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match=f"missing \\['{dropped}'\\]"):
        train(_cfg(workspace, tmp_path, stage=2, max_steps=2, save_steps=1), resume=True)


def test_deepspeed_takes_accumulation_clipping_and_micro_batch_from_the_training_config():
    """An accelerate config that says gradient_accumulation_steps: 1 would make DeepSpeed step
    after every micro-batch; the trainer fills these values in or refuses a conflicting one."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from llava_jp.train import strategy

    def accelerator(ds_config):
        plugin = SimpleNamespace(deepspeed_config=ds_config, zero_stage=2)
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin),
                               gradient_accumulation_steps=1, num_processes=2)

    cfg = load_config("stage2", ["--gradient_accumulation_steps", "4", "--per_device_batch_size", "2"])
    acc = accelerator({"gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}})
    strategy.configure(acc, cfg)
    assert acc.gradient_accumulation_steps == 4
    assert acc.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] == 4
    assert acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 2
    assert acc.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == cfg.max_grad_norm
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1 but the training config's value is 4"):
        strategy.configure(accelerator({"gradient_accumulation_steps": 1}), cfg)
