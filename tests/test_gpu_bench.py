"""The one-shot GPU script runs end to end (here on CPU at the tiny size) and its FLOP count."""

import json

import pytest
import torch

from benchmarks.flops import SampleShape, model_for_counting, peak_tflops, sample_flops
from llava_jp.presets.builder import build_config, load_preset


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared machine: one thread never waits for another
    yield
    torch.set_num_threads(threads)


def test_gpu_script_writes_one_json_with_every_figure(tmp_path, one_thread, capsys):
    from benchmarks.gpu import main

    out = tmp_path / "gpu.json"
    assert main(["--size", "tiny", "--cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["preset"] == "tiny" and report["device"] == "cpu"
    assert report["failed"] == []
    for variant in ("stage1", "stage2", "stage2_lora", "stage2_qlora", "stage1_pixel_shuffle2", "stage2_pixel_shuffle2"):
        r = report[variant]
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] and r["model_tflop_per_step"] > 0
        assert all(x == x for x in r["loss_first_last"])  # finite: a real step ran
    # stage 1 trains the projector only (the trainer's own prepare_for_training), stage 2 the LM too
    assert report["stage1"]["trainable_parameters"] < report["stage2"]["trainable_parameters"]
    assert report["stage2"]["gradient_checkpointing"] is True  # the stage-2 recipe's setting
    # LoRA / QLoRA: the trainer's add_adapters (adapters + projector train, the LM base is frozen)
    lora, qlora = report["stage2_lora"], report["stage2_qlora"]
    assert lora["adapters"] == "lora" and qlora["adapters"] == "qlora" and lora["lora_r"] == 128
    assert 0 < lora["trainable_parameters"] == qlora["trainable_parameters"] < report["stage2"]["trainable_parameters"]
    # 2x2 pixel shuffle: a quarter of the image tokens (tiny: 4 x 4 -> 2 x 2), a shorter sequence
    assert report["stage1_pixel_shuffle2"]["image_tokens"] * 4 == report["stage1"]["image_tokens"]
    assert report["stage2_pixel_shuffle2"]["tokens_per_batch"] < report["stage2"]["tokens_per_batch"]
    assert report["decode"]["decode_tokens_per_s"] > 0 and report["decode"]["new_tokens"] == 8
    assert json.loads(capsys.readouterr().out) == report


def test_flops_follow_the_counting_rule_on_a_gpt2_lm():
    preset = load_preset("llava-jp-1.3b-s2")
    model = model_for_counting(build_config(preset))
    shape = SampleShape(tokens=1000, supervised=200)
    d, layers, vocab = 2048, 24, 50688
    lm_fwd = 2 * 1000 * 12 * d * d * layers + layers * 4 * 1000 * 1000 * d  # GPT-2 block: 12 d^2 weights
    s1, s2 = sample_flops(model, 1, shape), sample_flops(model, 2, shape)
    assert s1["flops_by_part"]["language_model"] == 2 * lm_fwd  # frozen: forward + input gradients
    assert s2["flops_by_part"]["language_model"] == 3 * lm_fwd  # trained: + weight gradients
    assert s2["flops_by_part"]["lm_head"] == 3 * 2 * 200 * d * vocab
    lora = sample_flops(model, 2, shape, lm_trains=False)  # LoRA: the frozen base pays as in stage 1
    assert lora["flops_by_part"]["language_model"] == 2 * lm_fwd and lora["flops_by_part"]["lm_head"] == 2 * 2 * 200 * d * vocab
    assert s1["s2_crops"] == 5 and s1["flops_by_part"]["vision_tower"] == s2["flops_by_part"]["vision_tower"]
    assert peak_tflops("NVIDIA H200") == 989.5 and peak_tflops("some new card") is None


def test_a_failing_variant_is_recorded_and_the_others_still_run(tmp_path, one_thread, monkeypatch, capsys):
    import benchmarks.gpu as gpu

    real = gpu.measure_stage

    def measure(stage, size, device, warmup, steps, peak, overrides, deadline, adapters=None, pixel_shuffle=1):
        if adapters == "qlora":
            raise ModuleNotFoundError("No module named 'bitsandbytes'")
        return real(stage, size, device, warmup, steps, peak, overrides, deadline, adapters, pixel_shuffle)

    monkeypatch.setattr(gpu, "measure_stage", measure)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--size", "tiny", "--cpu", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["failed"] == ["stage2_qlora"]
    assert report["stage2_qlora"]["error"] == "ModuleNotFoundError: No module named 'bitsandbytes'"
    assert report["stage2_pixel_shuffle2"]["samples_per_s"] > 0 and report["decode"]["decode_tokens_per_s"] > 0
