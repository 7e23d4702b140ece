"""`llava-jp bench`: ours against transformers' `LlavaForConditionalGeneration` on the same model.

The peer is built with the same vision tower, projector shape (mlp2x_gelu) and LM, and shares
our weights (same tensors), except for the two tables that must grow by the `<image>` token a
peer user adds to the vocabulary (token embedding and LM head; the new head row is zero). The
peer is used the way its users train it: labels of -100 on image and prompt positions, logits
over the whole vocabulary at every position, the vision tower run with its last layer and
pooling head. The peer has no S2, so the ratios compare ours single-scale; ours with S2 (the
recipe) is reported next to them. Every contender runs in the same process, alternating (the
order rotates every round), so a busy machine slows all of them alike; figures are medians of
the timed rounds after warm-up. Both sides' losses on the same batch are checked to agree
before timing (proof of equal work).

Sizes keep llm-jp's proportions (MISSION.md): vocabulary 50688, 729 image tokens per image,
stage-1 captions of 30-60 tokens, stage-2 conversations of a few hundred tokens, an LM whose
width/depth ratio is llm-jp-1.3b's (2048 / 24). `--size full` is the `llava-jp-1.3b-s2` preset
itself (random weights). `--memory` measures the peak memory of one full-size training step
(stage 1 or 2; full, LoRA or QLoRA) set up exactly as `llava-jp train` sets it up, for real or,
with `--fake`, under fake tensors (benchmarks/memory.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import (
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
)

from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

from benchmarks.sizes import BENCH_IMAGE_TOKEN_ID, BenchSize, _sample, _tokens, bench_size, padded_batch
from llava_jp.presets.builder import build_config, parse_preset
from llava_jp.train.features import FeatureCache
from llava_jp.core.modeling import IGNORE_INDEX, LlavaJpForConditionalGeneration


# -- models --------------------------------------------------------------------------------
def build_ours(size: BenchSize, s2: bool, share_from: LlavaJpForConditionalGeneration | None = None,
               pixel_shuffle: int = 1):
    """Ours with random weights; with `share_from`, its vision tower and LM are reused (same tensors)."""
    vision = {"config": size.vision, "feature_layer": -2}
    if s2:
        vision.update(s2_scales=size.s2_scales, s2_split_size=min(size.s2_scales))
    preset = parse_preset({"vision": vision, "language_model": {"config": size.language_model},
                           "tokenizer": "none", "projector": "mlp2x_gelu",
                           "projector_pixel_shuffle": pixel_shuffle}, source="bench")
    config = build_config(preset, pretrained=False)
    if share_from is None:
        model = LlavaJpForConditionalGeneration(config)
    else:
        model = LlavaJpForConditionalGeneration(config, vision_tower=share_from.vision_tower,
                                                language_model=share_from.language_model)
    model.set_image_token(BENCH_IMAGE_TOKEN_ID)
    return model


def _grown(module: nn.Module, extra_row: torch.Tensor) -> nn.Module:
    """A copy of an embedding / bias-free head with one more row (the peer's `<image>` token)."""
    weight = torch.cat([module.weight.detach(), extra_row[None].to(module.weight)])
    if isinstance(module, nn.Embedding):
        return nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=module.padding_idx)
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = nn.Parameter(weight)
    return head


def build_peer(ours: LlavaJpForConditionalGeneration) -> LlavaForConditionalGeneration:
    """transformers' LLaVA holding our weights: vision tower, projector, LM blocks and positions
    are our very tensors; the token embedding and head are copies with a row for `<image>`."""
    vocab = ours.config.text_config.vocab_size
    text_config = copy.deepcopy(ours.config.text_config)
    text_config.vocab_size = vocab + 1
    # the peer's users keep SigLIP's pooling head (ours drops it): the peer runs it, as before
    vision_config = copy.deepcopy(ours.config.vision_config)
    vision_config.vision_use_head = True
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=vocab, image_seq_length=ours.num_image_tokens,
        vision_feature_layer=ours.config.vision_feature_layer, vision_feature_select_strategy="full",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    config._attn_implementation = ours.language_model.config._attn_implementation
    with torch.device("meta"):
        peer = LlavaForConditionalGeneration(config)
    tower = peer.model.vision_tower
    for name in ("embeddings", "encoder", "post_layernorm"):
        setattr(tower, name, getattr(ours.vision_tower, name))
    tower.head = SiglipMultiheadAttentionPoolingHead(vision_config).to(ours.vision_tower.post_layernorm.weight)
    peer.model.multi_modal_projector.linear_1 = ours.multi_modal_projector[0]
    peer.model.multi_modal_projector.linear_2 = ours.multi_modal_projector[2]
    lm, ours_lm = peer.model.language_model, ours.language_model.base_model
    for name in ("wpe", "drop", "h", "ln_f"):  # GPT-2 (llm-jp-1.3b's architecture)
        setattr(lm, name, getattr(ours_lm, name))
    lm.wte = _grown(ours_lm.wte, ours_lm.wte.weight.detach().mean(0))
    peer.lm_head = _grown(ours.language_model.lm_head, torch.zeros(ours_lm.wte.weight.shape[1]))
    sync_peer(peer, ours)
    left = [n for n, t in [*peer.named_parameters(), *peer.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"peer tensors left unset: {left}")
    peer.generation_config = GenerationConfig()
    return peer


def sync_peer(peer: LlavaForConditionalGeneration, ours: LlavaJpForConditionalGeneration) -> None:
    """Copy our token embedding and head into the peer's grown copies (training steps make them drift)."""
    vocab = ours.config.text_config.vocab_size
    with torch.no_grad():
        peer.model.language_model.wte.weight[:vocab] = ours.language_model.base_model.wte.weight
        peer.lm_head.weight[:vocab] = ours.language_model.lm_head.weight
        peer.lm_head.weight[vocab:] = 0


# -- batches -------------------------------------------------------------------------------
def make_batch(size: BenchSize, stage: int, ours: LlavaJpForConditionalGeneration, seed: int) -> dict:
    """A right-padded training batch for `ours` (pixels at the single-scale size)."""
    rng = random.Random(seed)
    vocab = ours.config.text_config.vocab_size
    batch = size.stage1_batch if stage == 1 else size.stage2_batch
    samples = [_sample(size, stage, rng, ours.num_image_tokens, ours.config.image_token_id, vocab) for _ in range(batch)]
    return padded_batch(samples, ours.config.image_size, seed)


def for_peer(batch: dict, ours: LlavaJpForConditionalGeneration) -> dict:
    """The same batch as the peer sees it: `<image>` is a vocabulary id."""
    peer_batch = dict(batch)
    image = batch["input_ids"] == ours.config.image_token_id
    peer_batch["input_ids"] = batch["input_ids"].masked_fill(image, ours.config.text_config.vocab_size)
    return peer_batch


def s2_pixels(batch: dict, size: int) -> torch.Tensor:
    return nn.functional.interpolate(batch["pixel_values"], size=size, mode="bilinear", align_corners=False)


# -- timing --------------------------------------------------------------------------------
class Runner:
    """Device, precision and the alternating timer shared by every measurement."""

    def __init__(self, device: torch.device, precision: str):
        self.device = device
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else nullcontext())

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def alternate(self, contenders: dict, warmup: int, repeats: int) -> dict[str, dict]:
        """Run every contender `warmup` times, then `repeats` timed rounds, rotating the order.

        Returns per contender: the wall times, their median, the process CPU times and their
        median, what each call returned, and on CUDA the peak memory allocated during its calls.
        On one thread the CPU time is the work itself, without the time other processes held the
        core: the steadier figure on a shared machine. On several threads it also counts the
        time threads spin waiting for each other (docs/benchmarks.md, "Threads").
        """
        names = list(contenders)
        results = {n: {"times_s": [], "cpu_s": [], "returned": [], "peak_gib": 0.0} for n in names}
        for _ in range(warmup):
            for n in names:
                contenders[n]()
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                self.sync()
                start, cpu = time.perf_counter(), time.process_time()
                returned = contenders[n]()
                self.sync()
                results[n]["times_s"].append(time.perf_counter() - start)
                results[n]["cpu_s"].append(time.process_time() - cpu)
                results[n]["returned"].append(returned)
                if self.device.type == "cuda":
                    results[n]["peak_gib"] = max(results[n]["peak_gib"], torch.cuda.max_memory_allocated() / 2**30)
        for n in names:
            results[n]["median_s"] = statistics.median(results[n]["times_s"])
            results[n]["median_cpu_s"] = statistics.median(results[n]["cpu_s"])
        return results


def _optimizer(params: list[nn.Parameter], kind: str, lr: float) -> torch.optim.Optimizer:
    """One optimizer over every contender's trainable tensors: shared tensors are stepped by
    whichever contender ran last (a tensor without a gradient is skipped), so each step does
    exactly its own contender's work and shared weights keep one optimizer state."""
    unique = list({id(p): p for p in params}.values())
    if kind == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(unique, lr=lr)
    return torch.optim.AdamW(unique, lr=lr)


def _train_step(runner: Runner, optimizer, forward, step: bool = True) -> float:
    optimizer.zero_grad(set_to_none=True)
    with runner.autocast:
        loss = forward()
    loss.backward()
    if step:
        optimizer.step()
    return float(loss.detach())


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _loss_check(runner: Runner, ours, peer, batch: dict, peer_batch: dict) -> dict:
    with torch.no_grad(), runner.autocast:
        mine = float(ours(**batch, use_cache=False).loss)
        theirs = float(peer(**peer_batch, use_cache=False).loss)
    return {"ours": mine, "peer": theirs, "abs_diff": abs(mine - theirs)}


def _full_logits_loss(model: LlavaJpForConditionalGeneration, batch: dict) -> torch.Tensor:
    """Ours with the peer's loss path (logits at every position, our default forward): an ablation."""
    return model(**batch, use_cache=False).loss


def _whole_tower_features(model: LlavaJpForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Ours with the peer's vision path (every layer and the post-norm, hidden states kept; ours has no
    pooling head to run): an ablation."""
    with torch.no_grad():
        out = model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer]


def _parts(m: nn.Module) -> nn.Module:
    """The module holding `multi_modal_projector` and `language_model`: ours, or the peer's `.model`."""
    return m if isinstance(m, LlavaJpForConditionalGeneration) else m.model


def set_trainable(models: list[nn.Module], stage: int) -> None:
    """Stage 1: projectors only; stage 2: projectors + LMs (heads included). Towers stay frozen."""
    for m in models:
        m.requires_grad_(False)
    for m in models:
        _parts(m).multi_modal_projector.requires_grad_(True)
        if stage == 2:
            _parts(m).language_model.requires_grad_(True)
            if not isinstance(m, LlavaJpForConditionalGeneration):
                m.lm_head.requires_grad_(True)


def measure_training(runner: Runner, size: BenchSize, stage: int, ours, ours_s2, peer, ablations: bool,
                     cache_dir: Path | None, ours_s2_shuffled=None) -> dict:
    """One stage's training step for every contender, alternating; returns medians and checks.
    `ours_s2_shuffled` (optional): ours with S2 and token compression, on the same text."""
    device = runner.device
    set_trainable([ours, ours_s2, peer, *([ours_s2_shuffled] if ours_s2_shuffled else [])], stage)
    batch = make_batch(size, stage, ours, seed=stage)
    s2_batch = dict(batch, pixel_values=s2_pixels(batch, ours_s2.config.image_size))
    batch_d, s2_d, peer_d = _to(batch, device), _to(s2_batch, device), _to(for_peer(batch, ours), device)
    sync_peer(peer, ours)
    check = _loss_check(runner, ours, peer, batch_d, peer_d)
    lr = 1e-4 if stage == 1 else 1e-5
    params = [p for m in (ours, ours_s2, peer, ours_s2_shuffled) if m is not None for p in m.parameters() if p.requires_grad]
    optimizer = _optimizer(params, size.optimizer, lr)
    step = stage == 1 or size.stage2_optimizer_step

    def train_step(forward):
        return lambda: _train_step(runner, optimizer, forward, step)

    contenders = {
        "ours": train_step(lambda: ours(**batch_d, use_cache=False, supervised_only=True).loss),
        "peer": train_step(lambda: peer(**peer_d, use_cache=False).loss),
        "ours_s2": train_step(lambda: ours_s2(**s2_d, use_cache=False, supervised_only=True).loss),
    }
    if ours_s2_shuffled is not None:  # same seed: same text, fewer image placeholders
        shuffled = make_batch(size, stage, ours_s2_shuffled, seed=stage)
        shuffled_d = _to(dict(shuffled, pixel_values=s2_pixels(shuffled, ours_s2.config.image_size)), device)
        contenders["ours_s2_shuffled"] = train_step(
            lambda: ours_s2_shuffled(**shuffled_d, use_cache=False, supervised_only=True).loss)
        ours_s2_shuffled.train()
    if cache_dir is not None:
        names = [f"image-{i}.png" for i in range(batch["input_ids"].shape[0])]
        for model, key, pixels in ((ours, "ours_cached", batch_d), (ours_s2, "ours_s2_cached", s2_d)):
            cache = FeatureCache(cache_dir / key, key, model.num_vision_tokens, model.vision_feature_width)
            with torch.no_grad(), runner.autocast:
                cache.add(names, model.encode_images(pixels["pixel_values"]), [[0, 0]] * len(names))
            text = {k: v for k, v in pixels.items() if k != "pixel_values"}

            def cached(model=model, cache=cache, text=text):  # reading the memory-mapped features is timed
                features = cache.load(names).to(device)
                return model(**text, image_features=features, use_cache=False, supervised_only=True).loss

            contenders[key] = train_step(cached)
    if ablations:
        contenders["ours_full_logits"] = train_step(lambda: _full_logits_loss(ours, batch_d))
        text_d = {k: v for k, v in batch_d.items() if k != "pixel_values"}
        contenders["ours_whole_tower"] = train_step(lambda: ours(
            **text_d, image_features=_whole_tower_features(ours, batch_d["pixel_values"]), use_cache=False,
            supervised_only=True).loss)
    ours.train(), ours_s2.train(), peer.train()
    results = runner.alternate(contenders, size.warmup, size.repeats)
    tokens = int(batch["attention_mask"].sum())
    return {
        "optimizer_step": step,
        "batch": {"samples": batch["input_ids"].shape[0], "tokens": tokens, "padded_length": batch["input_ids"].shape[1],
                  "supervised_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())},
        "loss_check": check,
        "median_s": {n: r["median_s"] for n, r in results.items()},
        "times_s": {n: r["times_s"] for n, r in results.items()},
        "median_cpu_s": {n: r["median_cpu_s"] for n, r in results.items()},
        "tokens_per_s": {n: tokens / r["median_s"] for n, r in results.items()},
        **({"peak_gib": {n: r["peak_gib"] for n, r in results.items()}} if device.type == "cuda" else {}),
    }


class _TokenClock(LogitsProcessor):
    """Records when each new token's scores are ready (first call = time to first token)."""

    def __init__(self, sync):
        self.sync, self.stamps = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.stamps.append(time.perf_counter())
        return scores


def measure_generation(runner: Runner, size: BenchSize, ours, ours_s2, peer) -> dict:
    """Greedy decoding of `new_tokens` tokens after an image prompt (batch 1), alternating."""
    device = runner.device
    rng = random.Random(3)
    vocab = ours.config.text_config.vocab_size
    prompt = (_tokens(rng, size.system_tokens + 3, vocab) + [ours.config.image_token_id] * ours.num_image_tokens
              + _tokens(rng, 20, vocab))
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)
    pixels = torch.randn(1, 3, ours.config.image_size, ours.config.image_size, generator=torch.Generator().manual_seed(3))
    inputs = {"ours": {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels.to(device)},
              "peer": {"input_ids": ids.masked_fill(ids == ours.config.image_token_id, vocab), "attention_mask": mask,
                       "pixel_values": pixels.to(device)},
              "ours_s2": {"input_ids": ids, "attention_mask": mask,
                          "pixel_values": s2_pixels({"pixel_values": pixels}, ours_s2.config.image_size).to(device)}}
    generation = GenerationConfig(max_new_tokens=size.new_tokens, min_new_tokens=size.new_tokens, do_sample=False,
                                  eos_token_id=7, pad_token_id=0)
    models = {"ours": ours, "peer": peer, "ours_s2": ours_s2}

    def contender(name):
        def go():
            clock = _TokenClock(runner.sync)
            start = time.perf_counter()
            with torch.no_grad(), runner.autocast:
                out = models[name].generate(**inputs[name], generation_config=generation, logits_processor=[clock])
            new = out[0, -size.new_tokens:].tolist()
            return {"ttft_s": clock.stamps[0] - start,
                    "decode_tokens_per_s": (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0]),
                    "tokens": new}
        return go

    sync_peer(peer, ours)
    for m in models.values():
        m.eval()
    results = runner.alternate({n: contender(n) for n in models}, size.warmup, size.repeats)
    summary = {}
    for n, r in results.items():
        summary[n] = {
            "ttft_s": statistics.median(x["ttft_s"] for x in r["returned"]),
            "decode_tokens_per_s": statistics.median(x["decode_tokens_per_s"] for x in r["returned"]),
            "total_s": r["median_s"],
            "total_cpu_s": r["median_cpu_s"],
            "end_to_end_tokens_per_s": size.new_tokens / r["median_s"],
        }
    summary["same_tokens_as_peer"] = results["ours"]["returned"][0]["tokens"] == results["peer"]["returned"][0]["tokens"]
    summary["prompt_tokens"] = len(prompt)
    return summary


def padding_waste(size: BenchSize, ours, batch_size: int = 16, n: int = 4096) -> dict:
    """Fraction of padded positions in stage-2 batches, grouped by length (the recipe) or not."""
    from llava_jp.train.data import grouped_batches

    rng = random.Random(0)
    lengths = [len(_sample(size, 2, rng, ours.num_image_tokens, -1, 1000)[0]) for _ in range(n)]
    out = {}
    for name, group in (("grouped", True), ("ungrouped", False)):
        padded = real = 0
        for b in grouped_batches(lengths, [True] * n, batch_size, seed=0, group=group):
            real += sum(lengths[i] for i in b)
            padded += max(lengths[i] for i in b) * len(b)
        out[name] = 1 - real / padded
    return out


def run_bench(size: BenchSize, device: torch.device, precision: str, ablations: bool = False,
              stages: tuple[str, ...] = ("stage2", "stage1", "generate"), log=print, pixel_shuffle: int = 1) -> dict:
    """Every measurement in one process; returns the report (ratios first). With `pixel_shuffle`
    > 1, ours with S2 and that token compression is timed too (its own projector)."""
    runner = Runner(device, precision)
    torch.manual_seed(0)
    ours = build_ours(size, s2=False)
    ours_s2 = build_ours(size, s2=True, share_from=ours)
    shuffled = build_ours(size, s2=True, share_from=ours, pixel_shuffle=pixel_shuffle) if pixel_shuffle > 1 else None
    peer = build_peer(ours)
    if precision == "bf16":
        ours.vision_tower.to(torch.bfloat16)  # frozen, as `llava-jp train` stores it
        peer.model.vision_tower.head.to(torch.bfloat16)
    from llava_jp.train.optim import enable_activation_checkpointing

    for m in (ours, ours_s2, peer, *([shuffled] if shuffled else [])):
        m.to(device)
        if size.gradient_checkpointing:
            enable_activation_checkpointing(_parts(m).language_model)
    report: dict = {"device": str(device), "precision": precision, "torch_threads": torch.get_num_threads(),
                    "size": asdict(size)}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    log(f"bench on {device} ({precision}): ours vs transformers LlavaForConditionalGeneration; "
        f"{size.warmup} warm-up + {size.repeats} timed rounds, alternating")
    with tempfile.TemporaryDirectory() as tmp:
        if "stage2" in stages:
            report["stage2"] = measure_training(runner, size, 2, ours, ours_s2, peer, ablations, None, shuffled)
            log(_line("stage 2 step", report["stage2"]))
        if "stage1" in stages:
            report["stage1"] = measure_training(runner, size, 1, ours, ours_s2, peer, ablations, Path(tmp), shuffled)
            log(_line("stage 1 step", report["stage1"]))
    if "generate" in stages:
        report["generate"] = measure_generation(runner, size, ours, ours_s2, peer)
        g = report["generate"]
        log(f"generate {size.new_tokens} tokens: ttft ours {g['ours']['ttft_s']:.3f}s peer {g['peer']['ttft_s']:.3f}s "
            f"s2 {g['ours_s2']['ttft_s']:.3f}s | decode tok/s ours {g['ours']['decode_tokens_per_s']:.1f} "
            f"peer {g['peer']['decode_tokens_per_s']:.1f} s2 {g['ours_s2']['decode_tokens_per_s']:.1f}")
    report["padding_waste"] = padding_waste(size, ours)
    ratios = {}
    # Headline ratios are ratios of medians. `paired` divides the two times of each round (run
    # back to back) first, then takes the median: steadier when the machine's load drifts.
    paired = {}
    for stage, key, mine, theirs in (("stage2", "train_step_ratio", "ours", "peer"),
                                     ("stage1", "stage1_step_ratio", "ours", "peer"),
                                     ("stage1", "stage1_cache_speedup", "ours_s2", "ours_s2_cached")):
        if stage in report:
            times = report[stage]["times_s"]
            paired[key] = statistics.median(a / b for a, b in zip(times[mine], times[theirs]))
    if paired:
        report["paired"] = paired
    # the same ratios from process CPU time: on one thread, what the work costs whatever else runs
    cpu = {}
    for stage, key, mine, theirs in (("stage2", "train_step_ratio", "ours", "peer"),
                                     ("stage1", "stage1_step_ratio", "ours", "peer"),
                                     ("stage1", "stage1_cache_speedup", "ours_s2", "ours_s2_cached")):
        if stage in report:
            m = report[stage]["median_cpu_s"]
            cpu[key] = m[mine] / m[theirs]
    if "generate" in report:  # prompt + decoding, ours / peer (decode alone is not timed in CPU time)
        cpu["generate_total_ratio"] = report["generate"]["ours"]["total_cpu_s"] / report["generate"]["peer"]["total_cpu_s"]
    if cpu:
        report["cpu_time"] = cpu
    if "stage2" in report:
        m = report["stage2"]["median_s"]
        ratios["train_step_ratio"] = m["ours"] / m["peer"]
        ratios["train_step_ratio_s2"] = m["ours_s2"] / m["peer"]
    if "stage1" in report:
        m = report["stage1"]["median_s"]
        ratios["stage1_step_ratio"] = m["ours"] / m["peer"]
        ratios["stage1_step_ratio_s2"] = m["ours_s2"] / m["peer"]
        ratios["stage1_cache_speedup"] = m["ours_s2"] / m["ours_s2_cached"]
        ratios["stage1_cache_speedup_single_scale"] = m["ours"] / m["ours_cached"]
    for stage in ("stage1", "stage2"):
        if stage in report and "ours_s2_shuffled" in report[stage]["median_s"]:
            m = report[stage]["median_s"]
            ratios[f"{stage}_pixel_shuffle_speedup"] = m["ours_s2"] / m["ours_s2_shuffled"]
    if "generate" in report:
        g = report["generate"]
        ratios["generate_tps_ratio"] = g["ours"]["decode_tokens_per_s"] / g["peer"]["decode_tokens_per_s"]
        ratios["generate_ttft_ratio"] = g["ours"]["ttft_s"] / g["peer"]["ttft_s"]
    return {**ratios, **report}


def _line(title: str, result: dict) -> str:
    m = result["median_s"]
    parts = " ".join(f"{n} {t:.3f}s" for n, t in m.items())
    return (f"{title}: {parts} | ours/peer {m['ours'] / m['peer']:.3f} | loss ours {result['loss_check']['ours']:.5f} "
            f"peer {result['loss_check']['peer']:.5f}")


# -- CLI -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=("mid", "full", "tiny"), default="mid",
                        help="mid: llm-jp's proportions, seconds per step on a CPU (default); "
                             "full: the llava-jp-1.3b-s2 preset itself; tiny: for tests")
    parser.add_argument("--full-size", dest="size", action="store_const", const="full", help="same as --size full")
    parser.add_argument("--memory", action="store_true",
                        help="peak memory of one full-size training step instead (stage 2: batch 1, length 1532)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2, help="--memory: which stage's step")
    parser.add_argument("--batch", type=int, help="--memory: batch (default: stage 1 32, stage 2 1)")
    parser.add_argument("--fake", action="store_true",
                        help="--memory: run the step under torch's FakeTensorMode (no arithmetic: any size in seconds, "
                             "bf16 on a CPU too); the live-tensor figures equal a real run's, the RSS figures mean nothing")
    parser.add_argument("--lora", dest="adapters", action="store_const", const="lora",
                        help="--memory --stage 2: the LoRA step (adapters on the LM, projector trained, LM frozen)")
    parser.add_argument("--qlora", dest="adapters", action="store_const", const="qlora",
                        help="--memory --stage 2: the QLoRA step (LoRA over a bitsandbytes 4-bit NF4 LM)")
    parser.add_argument("--lora-r", type=int, default=128, help="--lora/--qlora: rank (lora_alpha = 2 x rank; default 128)")
    parser.add_argument("--checkpointing", choices=("recipe", "on", "off"), default="recipe",
                        help="--memory: gradient checkpointing as the stage's recipe config says, or forced")
    parser.add_argument("--cached-features", action="store_true",
                        help="--memory --stage 1: images as feature-cache rows (the tower does not run)")
    parser.add_argument("--lm-layers", type=int, help="--memory: LM depth (full width)")
    parser.add_argument("--loader", action="store_true",
                        help="images/s of the training collator per DataLoader worker (768 px, COCO-sized JPEGs) "
                             "against the samples/s a full-size step consumes on an H200 at 40%% MFU")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="with --loader: DataLoader worker counts to time (default 0 1 2)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on CUDA and with --fake, fp32 on CPU")
    parser.add_argument("--repeats", type=int, help="timed rounds (default: 5, or 3 at full size)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", nargs="+", default=None, metavar="N|all",
                        help="CPU thread counts to run the whole bench at, one after the other (default on CPU: "
                             "1 all; 'all' = one per core); the top-level ratios are the first count's, and "
                             "`by_threads` holds every count's (docs/benchmarks.md explains why they differ)")
    parser.add_argument("--only", nargs="+", choices=("stage2", "stage1", "generate"),
                        help="measure only these")
    parser.add_argument("--ablations", action="store_true",
                        help="also time ours with each of the peer's wastes put back, one at a time")
    parser.add_argument("--pixel-shuffle", type=int, default=1, metavar="F",
                        help="also time ours with S2 and FxF token compression before the projector (2: 729 -> 196 "
                             "image tokens; stage1/2_pixel_shuffle_speedup = ours_s2 / ours_s2_shuffled)")
    parser.add_argument("--json", action="store_true", help="end the output with one JSON object")


HEADLINE = ("train_step_ratio", "stage1_step_ratio", "stage1_cache_speedup", "generate_tps_ratio",
            "stage1_pixel_shuffle_speedup", "stage2_pixel_shuffle_speedup")


def thread_counts(values: list[str]) -> list[int]:
    """`--threads` values: positive integers or `all` (one per core this process may use)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = []
    for v in values:
        if v == "all":
            counts.append(cores)
        elif v.isdigit() and int(v) > 0:
            counts.append(int(v))
        else:
            raise ValueError(f"expected positive integers or 'all', got {v!r}")
    return counts


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if getattr(args, "fake", False):  # fake tensors live on the CPU; nothing is computed, so bf16 costs nothing
        device = torch.device("cpu")
    precision = args.precision if args.precision != "auto" else (
        "bf16" if device.type == "cuda" or getattr(args, "fake", False) else "fp32")
    try:
        threads = thread_counts(args.threads or (["1", "all"] if device.type == "cpu" and not (args.memory or args.loader)
                                                 else ["all"]))
    except ValueError as err:
        print(f"error: --threads: {err}", file=sys.stderr)
        return 2
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    if args.loader:
        from benchmarks.loader import run_loader_bench

        torch.set_num_threads(threads[0])
        report = run_loader_bench(args.workers, log=log)
    elif args.memory:
        from benchmarks.memory import memory_step

        torch.set_num_threads(threads[0])
        checkpointing = {"recipe": None, "on": True, "off": False}[args.checkpointing]
        if args.adapters and args.stage != 2:
            print("error: --lora/--qlora: adapters train stage 2; drop --stage 1", file=sys.stderr)
            return 2
        if args.batch is not None and args.batch < 1:
            print(f"error: --batch: must be >= 1, got {args.batch}", file=sys.stderr)
            return 2
        report = memory_step(device, precision, stage=args.stage, batch=args.batch, gradient_checkpointing=checkpointing,
                             cached_features=args.cached_features, lm_layers=args.lm_layers, fake=args.fake,
                             adapters=args.adapters, lora_r=args.lora_r)
        kind = {None: "", "lora": f", LoRA r={args.lora_r}", "qlora": f", QLoRA r={args.lora_r}"}[args.adapters]
        log(f"full-size stage-{args.stage} step ({precision}, batch {report['batch']}, length {report['seq_len']}, "
            f"{report['lm_layers']} LM layers, checkpointing {report['gradient_checkpointing']}{kind}"
            f"{', fake tensors' if args.fake else ''}): peak tensor memory {report['peak_tensor_gib']:.2f} GiB"
            + ("" if args.fake else f", peak RSS {report['peak_rss_gib']:.2f} GiB")
            + (f", CUDA peak allocated {report['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in report else ""))
    else:
        size = bench_size(args.size)
        if args.repeats:
            size.repeats = args.repeats
        if args.warmup is not None:
            size.warmup = args.warmup
        by_threads = {}
        for i, n in enumerate(threads):
            torch.set_num_threads(n)
            log(f"-- {n} thread(s)")
            one = run_bench(size, device, precision, args.ablations, tuple(args.only or ("stage2", "stage1", "generate")), log,
                            args.pixel_shuffle)
            by_threads[str(n)] = {k: one[k] for k in (*HEADLINE, "paired", "cpu_time") if k in one}
            for key in HEADLINE:
                if key in one:
                    log(f"{key} ({n} thread(s)): {one[key]:.3f}")
            if i == 0:
                report = one
        report["by_threads"] = by_threads
    if args.json:
        print(json.dumps(report, ensure_ascii=False, default=_jsonable))
    return 0


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
