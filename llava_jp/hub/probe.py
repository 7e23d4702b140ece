"""The probe `llava-jp release` runs on both sides of its check.

`probe` runs one greedy generation and returns what must match. Run as a script
(`python -I release_probe.py RELEASE IMAGE QUESTION N OUT`), this file loads a release folder
the way a hub user does (Auto classes, `trust_remote_code=True`, fp32, CPU) in a process where
importing `llava_jp` raises, probes it, saves the tensors to OUT (safetensors) and prints a JSON
line saying what was loaded. Only transformers and torch are imported here, never this package.
"""

from __future__ import annotations


def probe(model, processor, image_path: str, question: str, max_new_tokens: int) -> dict:
    """Greedy new tokens, the prompt ids, and the logits at every generated position (plus the next)."""
    import torch
    from PIL import Image

    batch = processor(text=[question], images=[Image.open(image_path)])
    with torch.no_grad():
        new = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        ids = torch.cat([batch["input_ids"], new], dim=1)
        logits = model(input_ids=ids, pixel_values=batch["pixel_values"]).logits[0, batch["input_ids"].shape[1] - 1:]
    return {"prompt_ids": batch["input_ids"][0], "tokens": new[0], "logits": logits.contiguous()}


def block_llava_jp() -> None:
    """Make every later `import llava_jp...` in this process raise ImportError."""
    import importlib.abc
    import sys

    class BlockLlavaJp(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "llava_jp" or name.startswith("llava_jp."):
                raise ImportError(f"{name} is blocked: a release must load without llava-jp")

    sys.meta_path.insert(0, BlockLlavaJp())


def _main() -> None:
    import json
    import sys

    block_llava_jp()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    release, image_path, question, max_new_tokens, out = sys.argv[1:6]
    # Deliberate, and the only trust_remote_code in the package (tests/reliability/test_loading_safety.py):
    # RELEASE is the folder `llava-jp release` has just generated from this package's own source.
    model = AutoModelForImageTextToText.from_pretrained(release, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(release, trust_remote_code=True)
    save_file(probe(model, processor, image_path, question, int(max_new_tokens)), out)
    print(json.dumps({
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
        "llava_jp_imported": any(m == "llava_jp" or m.startswith("llava_jp.") for m in sys.modules),
    }))


if __name__ == "__main__":
    _main()
