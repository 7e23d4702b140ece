"""Peak memory of one full-size training step (`llava-jp bench --memory [--stage 1]`).

The step is set up exactly as `llava-jp train --config stage2` (or `stage1`) sets it up, through
the same `prepare_for_training` (the dtype policy: fp32 master weights for what trains, frozen
parts stored in the compute dtype; stage 2: 8-bit AdamW with 32-bit state for embeddings,
gradient checkpointing), on `llava-jp-1.3b-s2` with random weights. Stage 2: batch 1 at length
1532. Stage 1: a caption of `caption_tokens` after the 729 image tokens (~770 tokens), at the
batch asked for; with `cached_features` the images come as feature-cache rows (the tower does
not run), as with `feature_cache:`.

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

from benchmarks.sizes import _sample, bench_size
from llava_jp.presets.builder import build_config, load_preset
from llava_jp.core.modeling import LlavaJpForConditionalGeneration

GIB = 2**30


class TensorMemory(TorchDispatchMode):
    """Live tensor bytes while active: `baseline` tensors plus every storage an op creates, until
    it is freed; `peak` is the maximum."""

    def __init__(self, baseline: list[torch.Tensor]):
        super().__init__()
        self._live: dict[int, int] = {}
        for t in baseline:
            self._add(t)
        self.peak = self.live

    @property
    def live(self) -> int:
        return sum(self._live.values())

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._live or tensor.device.type == "meta":
            return
        self._live[key] = storage.nbytes()
        weakref.finalize(storage, self._live.pop, key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        before = len(self._live)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        if len(self._live) != before:
            self.peak = max(self.peak, self.live)
        return out


def _long_sample(model: LlavaJpForConditionalGeneration, seq_len: int) -> tuple[list[int], list[int]]:
    """A stage-2 conversation (one image, question/answer turns) cut to exactly `seq_len` tokens."""
    ids, labels = _sample(bench_size("tiny"), 2, random.Random(0), model.num_image_tokens, model.config.image_token_id,
                          model.config.text_config.vocab_size, turns=1)
    rng = random.Random(1)
    while len(ids) < seq_len:  # more answer text, all supervised
        more = [rng.randrange(100, model.config.text_config.vocab_size) for _ in range(100)]
        ids, labels = ids + more, labels + more
    return ids[:seq_len], labels[:seq_len]


def _caption_sample(model: LlavaJpForConditionalGeneration, caption_tokens: int) -> tuple[list[int], list[int]]:
    """A stage-1 sample: the image tokens, then `caption_tokens` supervised caption tokens."""
    rng = random.Random(0)
    caption = [rng.randrange(100, model.config.text_config.vocab_size) for _ in range(caption_tokens)]
    n = model.num_image_tokens
    return [model.config.image_token_id] * n + caption, [-100] * n + caption


def memory_step(device: torch.device, precision: str, seq_len: int = 1532,
                preset_name: str = "llava-jp-1.3b-s2", stage: int = 2, batch: int = 1,
                gradient_checkpointing: bool | None = None, cached_features: bool = False,
                caption_tokens: int = 40, lm_layers: int | None = None) -> dict:
    """One training step; returns peak memory figures and live tensor bytes after each phase.

    `precision="fp32"` runs without autocast (CPUs without bf16 units run bf16 matmuls hundreds
    of times slower). Stage 2 keeps the bf16 run's storage (the frozen tower still computes in
    bf16, as stored); stage 1 then stores its frozen parts in fp32 too (policy for
    `mixed_precision: no`), so its figures bound the bf16 run's from above.
    `gradient_checkpointing` None: as the stage's recipe config says. `lm_layers`: build the LM
    with this many layers (full width): activations grow linearly with depth and batch, so runs
    at 2 and 4 layers, batch 1 and 2, extrapolate to 24 layers at batch 32 on a machine where the
    full step does not fit or takes hours (docs/training.md).
    Run it in a fresh process: the RSS peak is the process's.
    """
    import psutil

    from llava_jp.train.config import load_config
    from llava_jp.train.optim import build_optimizer, prepare_for_training

    preset = load_preset(preset_name)
    if lm_layers is not None:
        preset.language_model.config = {**preset.language_model.config, "n_layer": lm_layers}
    overrides = {"gradient_checkpointing": gradient_checkpointing} if gradient_checkpointing is not None else {}
    if stage == 2:
        cfg = load_config("stage2", preset=preset_name, data_path="unused", per_device_batch_size=1,
                          mixed_precision="bf16", optimizer="adamw_8bit", **({"gradient_checkpointing": True} | overrides))
    else:
        cfg = load_config("stage1", preset=preset_name, data_path="unused", per_device_batch_size=batch,
                          mixed_precision="bf16" if precision == "bf16" else "no", **overrides)
    torch.manual_seed(0)
    model = LlavaJpForConditionalGeneration(build_config(preset, pretrained=False))
    prepare_for_training(model, cfg)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    if stage == 2:
        ids, labels = _long_sample(model, seq_len)
        batch = 1
    else:
        ids, labels = _caption_sample(model, caption_tokens)
    seq_len = len(ids)
    inputs = {"input_ids": torch.tensor([ids] * batch), "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
              "labels": torch.tensor([labels] * batch)}
    if cached_features:  # what `feature_cache:` feeds: bf16 rows of the frozen tower's output
        inputs["image_features"] = torch.randn(batch, model.num_image_tokens, model.projector_input_width).to(torch.bfloat16)
    else:
        inputs["pixel_values"] = torch.randn(batch, 3, model.config.image_size, model.config.image_size)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tracker = TensorMemory([*model.parameters(), *model.buffers(), *inputs.values()])
    live = {"model_and_batch": tracker.live / GIB}
    start = time.perf_counter()
    with tracker:
        with autocast:
            loss = model(**inputs, use_cache=False).loss
        live["after_forward"] = tracker.live / GIB
        loss.backward()
        live["after_backward"] = tracker.live / GIB
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        live["after_optimizer_step"] = tracker.live / GIB
        optimizer.zero_grad(set_to_none=True)
    report = {
        "preset": preset_name, "lm_layers": model.config.text_config.num_hidden_layers, "stage": stage, "device": str(device), "compute": precision, "seq_len": seq_len,
        "batch": batch, "gradient_checkpointing": cfg.gradient_checkpointing, "cached_features": cached_features,
        "supervised_tokens": batch * sum(label != -100 for label in labels[1:]),
        "loss": float(loss.detach()), "step_s": time.perf_counter() - start,
        "peak_tensor_gib": tracker.peak / GIB, "live_tensor_gib": live,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "final_rss_gib": psutil.Process().memory_info().rss / GIB,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if device.type == "cuda":
        report["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        report["gpu"] = torch.cuda.get_device_name(device)
    return report
