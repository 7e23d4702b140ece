"""`llava-jp bench --memory`: the live-tensor count, its fake-tensor mode (which must give the
real run's figures exactly), and the LoRA / QLoRA steps."""

import pytest
import torch

from benchmarks.memory import TensorMemory, memory_step
from llava_jp.cli import main

CPU = torch.device("cpu")


def _bnb_4bit_reason() -> str | None:
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(16, 16, quant_type="nf4").to("cpu")
        layer(torch.randn(2, 16))
    except Exception as err:  # noqa: BLE001 -- any failure means: not supported here
        return f"bitsandbytes 4-bit does not run on this CPU: {type(err).__name__}: {err}"
    return None


@pytest.mark.parametrize("fake", [False, True])
def test_live_bytes_count_a_storage_once_and_drop_it_when_freed(fake):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mib = 2**20
    with FakeTensorMode() if fake else torch.no_grad():
        a = torch.empty(mib // 4)
        tracker = TensorMemory([a])
        with tracker:
            b = a * 2                   # +1 MiB
            view = b.view(2, -1)        # same storage: +0
            del b
            c = view + 1                # +1 MiB -> 3 MiB live
            del view                    # b's storage freed -> 2 MiB
            d = c * 3                   # 3 MiB
    assert tracker.peak == 3 * mib and tracker.live == 3 * mib
    del c, d


STEPS = {
    "stage2": dict(seq_len=128),
    "stage1": dict(stage=1, batch=2, gradient_checkpointing=False),
    "stage1-checkpointed-cache": dict(stage=1, batch=2, gradient_checkpointing=True, cached_features=True),
    "lora": dict(seq_len=128, adapters="lora", lora_r=8),
    "qlora": dict(seq_len=128, adapters="qlora", lora_r=8),
}


@pytest.mark.parametrize("name", STEPS)
def test_fake_step_counts_exactly_the_bytes_of_the_real_step(name):
    """The fake-tensor step (how the full-size figures are measured) against the same step run
    for real: peak and every phase's live bytes equal, to the byte."""
    if name == "qlora" and _bnb_4bit_reason():
        pytest.skip(_bnb_4bit_reason())
    real = memory_step(CPU, "fp32", preset_name="tiny", **STEPS[name])
    fake = memory_step(CPU, "fp32", preset_name="tiny", fake=True, **STEPS[name])
    assert fake["fake"] and not real["fake"] and fake["loss"] is None and real["loss"] == real["loss"]
    assert fake["peak_tensor_gib"] == real["peak_tensor_gib"]
    assert fake["live_tensor_gib"] == real["live_tensor_gib"]
    assert fake["trainable_parameters"] == real["trainable_parameters"]


def test_lora_and_qlora_steps_need_less_than_full_fine_tuning():
    full = memory_step(CPU, "bf16", preset_name="tiny", seq_len=128, fake=True)
    lora = memory_step(CPU, "bf16", preset_name="tiny", seq_len=128, fake=True, adapters="lora", lora_r=8)
    assert lora["trainable_parameters"] < full["trainable_parameters"] / 2
    assert lora["peak_tensor_gib"] < full["peak_tensor_gib"]
    # no gradient and no optimizer state for the LM: far less added by backward + step
    grow = lambda r: r["live_tensor_gib"]["after_optimizer_step"] - r["live_tensor_gib"]["model_and_batch"]  # noqa: E731
    assert grow(lora) < grow(full) / 4
    if not _bnb_4bit_reason():
        qlora = memory_step(CPU, "bf16", preset_name="tiny", seq_len=128, fake=True, adapters="qlora", lora_r=8)
        assert qlora["live_tensor_gib"]["model_and_batch"] < lora["live_tensor_gib"]["model_and_batch"]


def test_bench_quantizes_the_lm_as_the_trainer_loads_a_qlora_base(train_workspace):
    """The bench's in-memory 4-bit LM has the tensors (names, shapes, dtypes, values) that the
    trainer's `load_model(..., quantization_config=)` gives for the same weights."""
    reason = _bnb_4bit_reason()
    if reason:
        pytest.skip(reason)
    from benchmarks.memory import _quant_state_tensors, quantize_language_model
    from llava_jp.infer.load import load_model
    from llava_jp.train import lora
    from llava_jp.train.config import load_config

    cfg = load_config(None, ["--model", str(train_workspace["base"]), "--data_path", "unused", "--stage", "2",
                             "--lora_enable", "--bits", "4", "--mixed_precision", "bf16"])
    loaded, _ = load_model(cfg.model, dtype=torch.float32, quantization_config=lora.quantization_config(cfg))
    ours, _ = load_model(cfg.model, dtype=torch.float32)
    quantize_language_model(ours, lora.quantization_config(cfg))
    a, b = dict(loaded.named_parameters()), dict(ours.named_parameters())
    assert a.keys() == b.keys()
    assert any(type(p).__name__ == "Params4bit" for p in a.values())
    for name in a:
        assert type(a[name]) is type(b[name]) and a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    qa, qb = _quant_state_tensors(loaded), _quant_state_tensors(ours)
    assert len(qa) == len(qb) > 0 and all(torch.equal(x, y) for x, y in zip(qa, qb))


def test_bench_memory_refuses_adapters_for_stage_1(capsys):
    assert main(["bench", "--memory", "--stage", "1", "--lora", "--fake"]) == 2
    assert "--lora/--qlora" in capsys.readouterr().err
