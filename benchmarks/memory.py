"""Peak memory of one full-size training step (`llava-jp bench --memory [--stage 1] [--lora|--qlora]
[--fake]`).

The step is set up exactly as `llava-jp train --config stage2` (or `stage1`) sets it up, through
the same `prepare_for_training` (the dtype policy: fp32 master weights for what trains, frozen
parts stored in the compute dtype; stage 2: 8-bit AdamW with 32-bit state for embeddings,
gradient checkpointing), on `llava-jp-1.3b-s2` with random weights. Stage 2: batch 1 at length
1532. Stage 1: a caption of `caption_tokens` after the 729 image tokens (~770 tokens), at the
batch asked for; with `cached_features` the images come as feature-cache rows (the tower does
not run), as with `feature_cache:`. Stage 2 with LoRA / QLoRA: as `--lora_enable [--bits 4]`
sets it up. With `fake`, the step runs under `FakeTensorMode` (benchmarks/fake.py): the same
live bytes, counted without arithmetic, so recipe-size steps that need 145 GiB or hours of CPU
are measured in a minute.

Three figures:
- CUDA: `torch.cuda.max_memory_allocated` (what decides whether a GPU fits).
- Any device: the peak of live tensor storage bytes, counted op by op (`TensorMemory`). It is
  what `max_memory_allocated` measures, without the CUDA allocator's rounding, and it counts a
  custom op (bitsandbytes' optimizer update) by its outputs only, as its fused CUDA kernel has no
  temporaries; on CPU it is the figure to compare with a GPU's memory.
- CPU: the process's peak resident set size, which adds the Python/torch runtime, freed memory
  the C allocator keeps, and the fp32 temporaries of bitsandbytes' unfused CPU optimizer.
"""

from __future__ import annotations

import random
import resource
import time
import weakref
from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.sizes import BENCH_IMAGE_TOKEN_ID, _sample, bench_size
from llava_jp.presets.builder import build_config, load_preset
from llava_jp.core.modeling import LlavaJpForConditionalGeneration

GIB = 2**30


class TensorMemory(TorchDispatchMode):
    """Live tensor bytes while active: `baseline` tensors plus every storage an op creates, until
    it is freed; `peak` is the maximum.

    A storage is known by its Python object (torch keeps one object per storage for as long as
    the storage lives) and forgotten when that object is finalized, so fake and meta tensors,
    whose storages have no address, count like real ones."""

    def __init__(self, baseline: list[torch.Tensor], aliases: dict[int, int] | None = None):
        super().__init__()
        self._aliases = aliases or {}  # storage id -> the id of the storage it stands for
        self._live: dict[int, int] = {}
        self.live = 0
        for t in baseline:
            self._add(t)
        self.peak = self.live

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live or self._aliases.get(key) in self._live:
            return
        self._live[key] = storage.nbytes()
        self.live += self._live[key]
        weakref.finalize(storage, self._drop, key)

    def _drop(self, key: int) -> None:
        self.live -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self.peak = max(self.peak, self.live)
        return out


def _long_sample(config, n_image_tokens: int, seq_len: int) -> tuple[list[int], list[int]]:
    """A stage-2 conversation (one image, question/answer turns) cut to exactly `seq_len` tokens."""
    ids, labels = _sample(bench_size("tiny"), 2, random.Random(0), n_image_tokens, config.image_token_id,
                          config.text_config.vocab_size, turns=1)
    rng = random.Random(1)
    while len(ids) < seq_len:  # more answer text, all supervised
        more = [rng.randrange(100, config.text_config.vocab_size) for _ in range(100)]
        ids, labels = ids + more, labels + more
    return ids[:seq_len], labels[:seq_len]


def _caption_sample(config, n_image_tokens: int, caption_tokens: int) -> tuple[list[int], list[int]]:
    """A stage-1 sample: the image tokens, then `caption_tokens` supervised caption tokens."""
    rng = random.Random(0)
    caption = [rng.randrange(100, config.text_config.vocab_size) for _ in range(caption_tokens)]
    return [config.image_token_id] * n_image_tokens + caption, [-100] * n_image_tokens + caption


def quantize_language_model(model: LlavaJpForConditionalGeneration, quantization, fake: bool = False) -> None:
    """The LM's linear layers in bitsandbytes 4-bit, in memory, by the code `from_pretrained(...,
    quantization_config=)` runs when the trainer loads a QLoRA base (`lora.quantization_config`):
    transformers' bnb quantizer swaps the layers, its `Bnb4bitQuantize` quantizes each weight.
    `tests/test_bench_memory.py` checks the result has the tensors of the trainer's loaded model.

    `fake`: bitsandbytes' `Params4bit` cannot wrap a fake tensor, so each layer gets a real random
    weight (one layer's fp32 weight at a time), quantized for real: the 4-bit base is real
    memory, counted like the fake tensors; fake mode reads it through fake copies, counted as
    the real storage (`TensorMemory` aliases)."""
    from torch.utils._python_dispatch import _disable_current_modes
    from transformers.integrations.bitsandbytes import Bnb4bitQuantize
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization, pre_quantized=False)
    with _disable_current_modes() if fake else nullcontext():  # bnb's layers are made on the meta device
        before = dict(model.named_modules())
        quantizer._process_model_before_weight_loading(model, device_map=None)
        convert = Bnb4bitQuantize(quantizer)
        for name, module in model.named_modules():
            if getattr(module, "source_cls", None) is None:
                continue
            old = before[name]
            weight = torch.randn(old.weight.shape) * 0.02 if fake else old.weight.detach()
            module.weight = convert.convert({f"{name}.weight": weight}, model=model)[f"{name}.weight"]
            if old.bias is not None:
                module.bias = torch.nn.Parameter(old.bias.detach(), requires_grad=False)
        quantizer._process_model_after_weight_loading(model)


def _quant_state_tensors(model) -> list[torch.Tensor]:
    """The 4-bit layers' quantization statistics (absmax, nested absmax, code): real memory that
    is neither a parameter nor a buffer."""
    found, stack = [], [getattr(p, "quant_state", None) for p in model.parameters()]
    while stack:
        state = stack.pop()
        if state is None:
            continue
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif hasattr(value, "absmax"):  # the nested state of double quantization
                stack.append(value)
    return found


def memory_step(device: torch.device, precision: str, seq_len: int = 1532,
                preset_name: str = "llava-jp-1.3b-s2", stage: int = 2, batch: int | None = None,
                gradient_checkpointing: bool | None = None, cached_features: bool = False,
                caption_tokens: int = 40, lm_layers: int | None = None, fake: bool = False,
                adapters: str | None = None, lora_r: int = 128) -> dict:
    """One training step; returns peak memory figures and live tensor bytes after each phase.

    `precision="fp32"` runs without autocast (CPUs without bf16 units run bf16 matmuls hundreds
    of times slower). Stage 2 keeps the bf16 run's storage (the frozen tower still computes in
    bf16, as stored); stage 1 then stores its frozen parts in fp32 too (policy for
    `mixed_precision: no`), so its figures bound the bf16 run's from above.
    `fake`: the same step under `FakeTensorMode` (benchmarks/fake.py): no arithmetic, so a step
    of any size runs in seconds in little memory, with bf16 autocast on a CPU too; the live
    tensor figures are the real run's (`tests/test_bench_memory.py` compares the two), the RSS figures
    mean nothing.
    `gradient_checkpointing` None: as the stage's recipe config says. `lm_layers`: build the LM
    with this many layers (full width). `adapters` ("lora" or "qlora", stage 2): the LoRA step
    as `llava-jp train --config stage2 --lora_enable [--bits 4] --lora_r R --lora_alpha 2R` sets
    it up (the trainer's `prepare_for_training` and `add_adapters`; QLoRA's base quantized by
    transformers' bitsandbytes code). Batch: stage 1 32, stage 2 1 unless given.
    Run it in a fresh process: the RSS peak is the process's.
    """
    from benchmarks.fake import KnownValues, eager_masks, fake_mode

    if not fake:
        return _memory_step(device, precision, seq_len, preset_name, stage, batch, gradient_checkpointing,
                            cached_features, caption_tokens, lm_layers, adapters, lora_r, None)
    mode = fake_mode()
    known = KnownValues(mode)
    with mode, known, eager_masks():
        report = _memory_step(device, precision, seq_len, preset_name, stage, batch, gradient_checkpointing,
                              cached_features, caption_tokens, lm_layers, adapters, lora_r, known)
    return report


def _memory_step(device, precision, seq_len, preset_name, stage, batch, gradient_checkpointing, cached_features,
                 caption_tokens, lm_layers, adapters, lora_r, known) -> dict:
    """`memory_step`'s body; under fake mode `known` (KnownValues) turns the batch's integer
    tensors into fake ones whose values stay known."""
    import psutil

    from llava_jp.train import lora
    from llava_jp.train.config import load_config
    from llava_jp.train.optim import build_optimizer, prepare_for_training

    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    from benchmarks.fake import renew_copied_parameters
    from transformers.initialization import no_init_weights

    fake = known is not None
    preset = load_preset(preset_name)
    if lm_layers is not None:
        preset.language_model.config = {**preset.language_model.config, "n_layer": lm_layers}
    overrides = {"gradient_checkpointing": gradient_checkpointing} if gradient_checkpointing is not None else {}
    if adapters not in (None, "lora", "qlora"):
        raise ValueError(f"adapters: expected None, 'lora' or 'qlora', got {adapters!r}")
    if adapters and stage != 2:
        raise ValueError("adapters: LoRA trains stage 2")
    if stage == 2:
        batch = batch or 1
        lora_keys = ({"model": preset_name, "preset": None, "lora": True, "bits": 4 if adapters == "qlora" else 16,
                      "lora_r": lora_r, "lora_alpha": 2 * lora_r} if adapters else {})
        cfg = load_config("stage2", data_path="unused", per_device_batch_size=batch, mixed_precision="bf16",
                          optimizer="adamw_8bit",
                          **({"preset": preset_name, "gradient_checkpointing": True} | overrides | lora_keys))
    else:
        batch = batch or 32
        cfg = load_config("stage1", preset=preset_name, data_path="unused", per_device_batch_size=batch,
                          mixed_precision="bf16" if precision == "bf16" else "no", **overrides)
    torch.manual_seed(0)
    # fake weights have no values to initialise (and the truncated-normal init loops on them)
    with no_init_weights() if fake else nullcontext():
        model = LlavaJpForConditionalGeneration(build_config(preset, pretrained=False))
    model.set_image_token(BENCH_IMAGE_TOKEN_ID)
    config, n_image_tokens, feature_width = model.config, model.num_image_tokens, model.projector_input_width
    if adapters == "qlora":
        quantize_language_model(model, lora.quantization_config(cfg), fake)
    prepare_for_training(model, cfg)
    depth = model.config.text_config.num_hidden_layers
    if adapters:
        model = lora.add_adapters(model, cfg)
        if fake:
            renew_copied_parameters(model)
    if not fake:  # fake tensors are made on the CPU, where they stay (`Module.to` would try to swap each)
        model.to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    if stage == 2:
        ids, labels = _long_sample(config, n_image_tokens, seq_len)
    else:
        ids, labels = _caption_sample(config, n_image_tokens, caption_tokens)
    seq_len = len(ids)
    with unset_fake_temporarily():
        inputs = {"input_ids": torch.tensor([ids] * batch), "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
                  "labels": torch.tensor([labels] * batch)}
    if fake:
        inputs = {k: known.fake(v) for k, v in inputs.items()}
    if cached_features:  # what `feature_cache:` feeds: bf16 rows of the frozen tower's output
        inputs["image_features"] = torch.randn(batch, n_image_tokens, feature_width).to(torch.bfloat16)
    else:
        inputs["pixel_values"] = torch.randn(batch, 3, config.image_size, config.image_size)
    inputs = {k: v if fake else v.to(device) for k, v in inputs.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    real_in_fake = [t for t in [*model.parameters(), *_quant_state_tensors(model)] if fake and not isinstance(t, FakeTensor)]
    # fake mode reads a real tensor (QLoRA's 4-bit base) through a fake copy with its own storage:
    # hold one copy per tensor (fake mode reuses it) and count its storage as the real one
    fake_copies = [known.fake_mode.from_tensor(t) for t in real_in_fake]
    aliases = {id(c.untyped_storage()): id(t.untyped_storage()) for c, t in zip(fake_copies, real_in_fake)}
    tracker = TensorMemory([*model.parameters(), *model.buffers(), *_quant_state_tensors(model), *inputs.values()], aliases)
    live = {"model_and_batch": tracker.live / GIB}
    start = time.perf_counter()
    with tracker:
        with autocast:
            loss = model(**inputs, use_cache=False, supervised_only=True).loss
        live["after_forward"] = tracker.live / GIB
        loss.backward()
        live["after_backward"] = tracker.live / GIB
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        live["after_optimizer_step"] = tracker.live / GIB
        optimizer.zero_grad(set_to_none=True)
    report = {
        "preset": preset_name, "lm_layers": depth, "stage": stage, "device": str(device),
        "compute": precision, "seq_len": seq_len, "batch": batch, "gradient_checkpointing": cfg.gradient_checkpointing,
        "cached_features": cached_features, "adapters": adapters, "lora_r": lora_r if adapters else None, "fake": fake,
        "supervised_tokens": batch * sum(label != -100 for label in labels[1:]),
        "loss": None if fake else float(loss.detach()), "step_s": time.perf_counter() - start,
        "peak_tensor_gib": tracker.peak / GIB, "live_tensor_gib": live,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "final_rss_gib": psutil.Process().memory_info().rss / GIB,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if device.type == "cuda":
        report["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        report["gpu"] = torch.cuda.get_device_name(device)
    return report

