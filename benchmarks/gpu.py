"""One-shot GPU measurement of the recipe: `python -m benchmarks.gpu --out gpu.json`.

On a CUDA machine, in well under 8 minutes, for `llava-jp-1.3b-s2` with random weights (no
download): stage-1 and stage-2 training steps at the recipe's per-device batch (tokens/s,
samples/s, MFU, peak memory), stage 2 with LoRA and QLoRA, both stages with 2x2 pixel-shuffle
token compression, and greedy decoding after an image prompt (time to first token, decode
tokens/s). Each stage is set up by the trainer's own `prepare_for_training`, `add_adapters` and
`build_optimizer` from the bundled `stage1` / `stage2` configs, so the figures follow the
recipe's dtype policy, optimizer and activation checkpointing as they are in this checkout.
Everything goes into one JSON file (and stdout); a variant that fails is recorded with its
error and the others still run (the exit status is then 1).

MFU = model FLOPs (`benchmarks/flops.py`: what the stage computes per sample, recomputation
excluded) x samples/s / the GPU's bf16 dense peak (known GPUs, or `--peak-tflops`).

`--size tiny` runs the same code on the tiny preset (CPU is fine): the plumbing test.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import random
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from benchmarks.flops import SampleShape, peak_tflops, sample_flops
from benchmarks.sizes import BENCH_IMAGE_TOKEN_ID, _sample, _tokens, bench_size, padded_batch
from llava_jp.core.modeling import IGNORE_INDEX, LlavaJpForConditionalGeneration
from llava_jp.files import write_text
from llava_jp.presets.builder import BUILTIN_TOKENIZERS, build_config, load_preset, load_tokenizer
from llava_jp.train.config import TrainConfig, load_config
from llava_jp.train.optim import build_optimizer, prepare_for_training

PRESETS = {"full": "llava-jp-1.3b-s2", "tiny": "tiny"}
GIB = 2**30


# LLaVA's LoRA recipe (finetune_lora.sh: r 128, alpha 256), as the memory bench measures it
LORA_R = 128
# name -> (stage, adapters, projector_pixel_shuffle)
VARIANTS = {
    "stage1": (1, None, 1), "stage2": (2, None, 1), "stage2_lora": (2, "lora", 1), "stage2_qlora": (2, "qlora", 1),
    "stage1_pixel_shuffle2": (1, None, 2), "stage2_pixel_shuffle2": (2, None, 2),
}


def _config(size: str, pixel_shuffle: int = 1):
    preset = load_preset(PRESETS[size])
    preset.projector_pixel_shuffle = pixel_shuffle
    tokenizer = load_tokenizer(preset.tokenizer) if preset.tokenizer in BUILTIN_TOKENIZERS else None
    return build_config(preset, pretrained=False, tokenizer=tokenizer)


def _model(config, device: torch.device) -> LlavaJpForConditionalGeneration:
    with torch.device(device):  # random init on the GPU itself: seconds, not a minute on the CPU
        model = LlavaJpForConditionalGeneration(config)
    model.set_image_token(BENCH_IMAGE_TOKEN_ID)  # below the ids the synthetic batches draw
    return model


def _train_config(stage: int, size: str, device: torch.device, overrides: list[str],
                  adapters: str | None = None) -> TrainConfig:
    """The bundled recipe config of `stage` (with `adapters`: as `--lora_enable [--bits 4]
    --lora_r 128 --lora_alpha 256` sets it); at tiny size or on CPU, a batch of 2 in fp32."""
    keys = {"preset": PRESETS[size]}
    if adapters:  # LoRA starts from a saved model; `model` only names it here (the weights are built in place)
        keys = {"model": PRESETS[size], "preset": None, "lora": True, "bits": 4 if adapters == "qlora" else 16,
                "lora_r": LORA_R, "lora_alpha": 2 * LORA_R}
    cfg = load_config(f"stage{stage}", overrides, data_path="unused", **keys)
    if device.type != "cuda":  # a CPU has no bf16 matrix units worth timing, and little memory
        cfg = dataclasses.replace(cfg, mixed_precision="no", per_device_batch_size=2)
    if cfg.optimizer == "adamw_8bit" and device.type != "cuda":
        cfg = dataclasses.replace(cfg, optimizer="adamw")
    return cfg


def make_batch(model: LlavaJpForConditionalGeneration, stage: int, batch: int, size: str, seed: int = 0) -> dict:
    """A right-padded batch shaped like the recipe's data (benchmarks/sizes.py)."""
    shapes = bench_size("mid" if size == "full" else "tiny")
    rng = random.Random(seed)
    vocab = model.config.text_config.vocab_size
    samples = [_sample(shapes, stage, rng, model.num_image_tokens, model.config.image_token_id, vocab) for _ in range(batch)]
    return padded_batch(samples, model.config.image_size, seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtypes(model: LlavaJpForConditionalGeneration) -> dict:
    return {part: str(next(getattr(model, part).parameters()).dtype).replace("torch.", "")
            for part in ("vision_tower", "multi_modal_projector", "language_model")}


def measure_stage(stage: int, size: str, device: torch.device, warmup: int, steps: int, peak: float | None,
                  overrides: list[str], deadline: float, adapters: str | None = None,
                  pixel_shuffle: int = 1) -> dict:
    """`warmup` + `steps` optimizer steps of `stage` as `llava-jp train` runs them, one micro-batch each."""
    from benchmarks.memory import quantize_language_model
    from llava_jp.train import lora

    cfg = _train_config(stage, size, device, overrides, adapters)
    torch.manual_seed(0)
    model = _model(_config(size, pixel_shuffle), device)
    n = cfg.per_device_batch_size
    batch = {k: v.to(device) for k, v in make_batch(model, stage, n, size, seed=stage).items()}
    tokens = int(batch["attention_mask"].sum())
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    # counted on the plain model: with adapters the LM base is frozen (forward + input gradients, as
    # in stage 1); the adapters' own matrices are added below (forward + both gradients)
    flops = sample_flops(model, stage, SampleShape(tokens=round(tokens / n), supervised=round(supervised / n)),
                         lm_trains=stage == 2 and not adapters)["flops"] * n
    if adapters == "qlora":
        quantize_language_model(model, lora.quantization_config(cfg))
    prepare_for_training(model, cfg)
    if adapters:
        model = lora.add_adapters(model, cfg)
        adapter_elements = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
        flops += 3 * 2 * tokens * adapter_elements
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.mixed_precision == "bf16" else nullcontext()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        with autocast:
            loss = model(**batch, use_cache=False, supervised_only=True).loss  # the trainer's loss path
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        losses.append(step())
        _sync(device)
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    step_s = statistics.median(times)
    result = {
        "per_device_batch_size": n, "tokens_per_batch": tokens, "supervised_tokens": supervised,
        "image_tokens": model.num_image_tokens, "adapters": adapters, "lora_r": LORA_R if adapters else None,
        "mixed_precision": cfg.mixed_precision, "optimizer": cfg.optimizer,
        "gradient_checkpointing": cfg.gradient_checkpointing, "parameter_dtypes": _dtypes(model),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "step_s": step_s, "step_times_s": times, "samples_per_s": n / step_s, "tokens_per_s": tokens / step_s,
        "model_tflop_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
        "loss_first_last": [losses[0], losses[-1]],
    }
    if peak:
        result["mfu"] = flops / step_s / (peak * 1e12)
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def measure_decode(size: str, device: torch.device, new_tokens: int, repeats: int) -> dict:
    """Greedy decoding (batch 1) after a 729-token image prompt, the model in bf16 on CUDA."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _model(_config(size), device).to(dtype).eval()
    vocab = model.config.text_config.vocab_size
    rng = random.Random(3)
    prompt = _tokens(rng, 33, vocab) + [model.config.image_token_id] * model.num_image_tokens + _tokens(rng, 20, vocab)
    ids = torch.tensor([prompt], device=device)
    side = model.config.image_size
    pixels = torch.randn(1, 3, side, side, device=device, dtype=dtype)
    eos = model.generation_config.eos_token_id
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=eos if eos is not None else 0)
    model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                   pad_token_id=kwargs["pad_token_id"])  # warm-up
    ttft, totals = [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        model.generate(input_ids=ids, pixel_values=pixels, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
        _sync(device)
        ttft.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.generate(input_ids=ids, pixel_values=pixels, **kwargs)
        _sync(device)
        totals.append(time.perf_counter() - start)
    first, total = statistics.median(ttft), statistics.median(totals)
    return {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "dtype": str(dtype).replace("torch.", ""),
            "ttft_s": first, "decode_tokens_per_s": (new_tokens - 1) / max(total - first, 1e-9),
            "end_to_end_tokens_per_s": new_tokens / total}


def _failure(err: Exception) -> dict:
    """What the report keeps of a measurement that raised (called inside its `except`)."""
    return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc().splitlines()[-12:]}


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    started = time.perf_counter()
    deadline = started + args.budget_s
    report: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
                    "preset": PRESETS[args.size], "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version()}
    peak = args.peak_tflops
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        peak = peak or peak_tflops(report["gpu"])
    report["peak_tflops"] = peak
    steps = 1 if args.size == "tiny" else args.steps
    warmup = 1 if args.size == "tiny" else args.warmup
    failed = []
    for name, (stage, adapters, pixel_shuffle) in VARIANTS.items():
        try:
            report[name] = measure_stage(stage, args.size, device, warmup, steps, peak, [], deadline,
                                         adapters, pixel_shuffle)
        except torch.OutOfMemoryError as err:
            report[name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            failed.append(name)
        except Exception as err:  # one variant's failure (a library missing on the machine, ...) keeps the others
            report[name] = _failure(err)
            failed.append(name)
        gc.collect()  # a failed variant's model is freed before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: {json.dumps(report[name])}", file=sys.stderr, flush=True)
    try:
        report["decode"] = measure_decode(args.size, device, 8 if args.size == "tiny" else args.new_tokens,
                                          1 if args.size == "tiny" else 3)
    except Exception as err:
        report["decode"] = _failure(err)
        failed.append("decode")
    report["wall_s"] = time.perf_counter() - started
    report["failed"] = failed
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-bench.json", help="JSON file to write (default gpu-bench.json)")
    parser.add_argument("--size", choices=tuple(PRESETS), default="full")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per stage (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's bf16 dense peak, if its name is not known")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="stop timing a stage's steps once this much time has passed (default 360)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, ensure_ascii=False, indent=1)
    write_text(Path(args.out), text + "\n")
    print(text)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
