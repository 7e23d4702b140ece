"""The probe `llava-jp release` runs on both sides of its check.

`probe` runs one greedy generation the way a transformers user does (chat template, processor,
`generate`, decode the tokens after the prompt) and returns what must match. Run as a script
(`python -I probe.py RELEASE IMAGE QUESTION N OUT`), this file loads a release folder the way a
hub user does (Auto classes, `trust_remote_code=True`, fp32, CPU) in a process where importing
`llava_jp` raises, probes it, saves the tensors to OUT (safetensors), checks the rest of what
users type (`user_idioms`) and prints a JSON line with what was loaded and what held. Only the
standard library, transformers, torch and PIL are imported here, never this package.
"""

from __future__ import annotations


def messages_for(question: str, image=None) -> list[dict]:
    """The standard transformers message: one user turn, an image item then the question."""
    item = {"type": "image"} if image is None else {"type": "image", **image}
    return [{"role": "user", "content": [item, {"type": "text", "text": question}]}]


def probe(model, processor, image_path: str, question: str, max_new_tokens: int) -> dict:
    """Greedy new tokens, the prompt ids, and the logits at every generated position (plus the next)."""
    import torch
    from PIL import Image

    prompt = processor.apply_chat_template(messages_for(question), add_generation_prompt=True, tokenize=False)
    batch = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    prompt_len = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        logits = model(input_ids=out, pixel_values=batch["pixel_values"]).logits[0, prompt_len - 1:]
    return {"prompt_ids": batch["input_ids"][0], "tokens": out[0, prompt_len:], "full": out[0],
            "logits": logits.contiguous()}


def user_idioms(model, processor, release: str, image_path: str, question: str, max_new_tokens: int,
                probed: dict) -> dict:
    """What every transformers VLM does, checked on the release (each entry True when it holds).
    `model` / `processor` are the release's, loaded through the Auto classes."""
    import functools
    import http.server
    import threading
    from pathlib import Path

    import torch
    from PIL import Image
    from transformers import AutoConfig, BatchFeature, pipeline

    config = AutoConfig.from_pretrained(release, trust_remote_code=True)
    image = Image.open(image_path)
    prompt = processor.apply_chat_template(messages_for(question), add_generation_prompt=True, tokenize=False)
    batch = processor(images=image, text=prompt, return_tensors="pt")
    ids = batch["input_ids"][0]
    vocab = model.get_input_embeddings().num_embeddings
    text_ids = ids[ids != processor.image_token_id]
    # the prompt once: its system text and user prefix occur once in the decoded ids
    decoded = processor.decode(text_ids)
    opening = prompt.split(processor.image_token)[0]
    checks = {
        "auto_classes": type(config).__name__ == "LlavaJpConfig"
        and type(model).__name__ == "LlavaJpForConditionalGeneration" and type(processor).__name__ == "LlavaJpProcessor",
        "chat_template_renders_list_content": prompt.endswith(processor.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False).split(question)[-1])
        and processor.image_token in prompt and question in prompt,
        "processor_returns_batchfeature": isinstance(batch, BatchFeature),
        "ids_in_vocabulary": bool(((ids >= 0) & (ids < vocab)).all()),
        "image_token_in_vocabulary": 0 <= processor.image_token_id < vocab
        and processor.tokenizer.convert_ids_to_tokens(processor.image_token_id) == processor.image_token,
        "prompt_once": decoded.count(opening) == 1,
    }
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        checks["generate_starts_with_prompt"] = torch.equal(out[0, :ids.numel()], ids)
        checks["new_tokens_after_prompt"] = torch.equal(out[0, ids.numel():], probed["tokens"])
        checks["decode_new_tokens"] = processor.decode(out[0, ids.numel():], skip_special_tokens=True) \
            == processor.decode(probed["tokens"], skip_special_tokens=True)
        checks["batch_decode_whole_output"] = isinstance(processor.batch_decode(out)[0], str)
        one_call = processor.apply_chat_template(messages_for(question, {"path": image_path}), add_generation_prompt=True,
                                                 tokenize=True, return_dict=True, return_tensors="pt")
        again = model.generate(**one_call, max_new_tokens=max_new_tokens, do_sample=False)
        checks["tokenize_true_same_tokens"] = isinstance(one_call, BatchFeature) and torch.equal(again, out)
    folder = Path(image_path).parent
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{Path(image_path).name}"
        pipe = pipeline("image-text-to-text", model=model, processor=processor)
        answer = pipe(text=messages_for(question, {"url": url}), max_new_tokens=max_new_tokens, return_full_text=False)
        expected = processor.decode(probed["tokens"], skip_special_tokens=True)
        checks["pipeline_with_image_url"] = answer[0]["generated_text"] == expected
    finally:
        server.shutdown()
    return checks


def base_model_idiom(release: str, processor, image_path: str, question: str) -> bool:
    """`AutoModel` gives the base model, whose forward returns the LM's last hidden states."""
    import torch
    from PIL import Image
    from transformers import AutoModel

    prompt = processor.apply_chat_template(messages_for(question), add_generation_prompt=True, tokenize=False)
    batch = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    base = AutoModel.from_pretrained(release, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
    return type(base).__name__ == "LlavaJpModel" and tuple(hidden.shape) == (
        1, batch["input_ids"].shape[1], base.config.text_config.hidden_size)


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
    import warnings

    block_llava_jp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForImageTextToText, AutoProcessor

        release, image_path, question, max_new_tokens, out = sys.argv[1:6]
        # Deliberate, and the only trust_remote_code in the package (tests/reliability/test_loading_safety.py):
        # RELEASE is the folder `llava-jp release` has just generated from this package's own source.
        model = AutoModelForImageTextToText.from_pretrained(release, trust_remote_code=True, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(release, trust_remote_code=True)
        probed = probe(model, processor, image_path, question, int(max_new_tokens))
        model_class = f"{type(model).__module__}.{type(model).__name__}"
        checks = user_idioms(model, processor, release, image_path, question, int(max_new_tokens), probed)
        del model  # the base model is another full copy
        checks["auto_model_returns_hidden_states"] = base_model_idiom(release, processor, image_path, question)
    save_file({k: v.clone().contiguous() for k, v in probed.items()}, out)
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    print(json.dumps({
        "model_class": model_class,
        "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
        "llava_jp_imported": any(m == "llava_jp" or m.startswith("llava_jp.") for m in sys.modules),
        "idioms": checks,
        "deprecation_warnings": deprecations,
    }))


if __name__ == "__main__":
    _main()
