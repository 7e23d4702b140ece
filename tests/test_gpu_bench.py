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
    for stage in ("stage1", "stage2"):
        r = report[stage]
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] and r["model_tflop_per_step"] > 0
        assert all(x == x for x in r["loss_first_last"])  # finite: a real step ran
    # stage 1 trains the projector only (the trainer's own prepare_for_training), stage 2 the LM too
    assert report["stage1"]["trainable_parameters"] < report["stage2"]["trainable_parameters"]
    assert report["stage2"]["gradient_checkpointing"] is True  # the stage-2 recipe's setting
    assert "stage2_lora" in report
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
    assert s1["s2_crops"] == 5 and s1["flops_by_part"]["vision_tower"] == s2["flops_by_part"]["vision_tower"]
    assert peak_tflops("NVIDIA H200") == 989.5 and peak_tflops("some new card") is None
