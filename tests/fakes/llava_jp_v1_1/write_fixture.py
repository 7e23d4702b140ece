"""Write a tiny LLaVA-JP v1.1 checkpoint with the predecessor's own code, and its own outputs.

Runs under transformers 4.40 (the predecessor's era; `.ci/extra/30-predecessor.sh` makes the
venv), never under llava-jp's environment. `llava/` next to this file is LLaVA-JP at its v1.1
release (tosiyuki/LLaVA-JP v1.1.0, d86a45d, Apache-2.0, unmodified). The steps follow its
`train_llava.py` (stage 1 and stage 2 of `scripts/*/..._v1.1.sh`, without the optimisation) and
its `demo_llava.py` (CPU path: float32, greedy here instead of sampling):

    python write_fixture.py OUT TOKENIZER_DIR

OUT/siglip   the vision tower as published (SiglipVisionModel + SiglipImageProcessor, 4.40 format)
OUT/lm       the LM as published (GPT2LMHeadModel)
OUT/stage1   config.json + mm_projector.bin (what its stage 1 saves)
OUT/stage2   config.json + model.safetensors + tokenizer (what its stage 2 saves; tower in bf16)
OUT/probe.png, OUT/reference.safetensors (pixel_values, input_ids, logits, tokens), OUT/reference.json
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import transformers
from PIL import Image, ImageDraw
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX  # noqa: E402
from llava.conversation import conv_templates  # noqa: E402
from llava.model.llava_gpt2 import LlavaGpt2ForCausalLM  # noqa: E402
from llava.train.dataset import tokenizer_image_token  # noqa: E402

QUESTION = "猫の隣には何がありますか？"
NEW_TOKENS = 8


def probe_image() -> Image.Image:
    """Not square and not a multiple of the input size, so resizing matters."""
    image = Image.merge("RGB", [Image.linear_gradient("L"), Image.radial_gradient("L"),
                                Image.linear_gradient("L").rotate(90)]).resize((97, 61))
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 8, 50, 30], fill=(230, 20, 20))
    draw.ellipse([48, 30, 90, 58], fill=(20, 60, 220))
    return image


def main(out: str, tokenizer_dir: str) -> None:
    assert transformers.__version__.startswith("4.40"), transformers.__version__
    torch.manual_seed(0)
    siglip, lm_dir = os.path.join(out, "siglip"), os.path.join(out, "lm")
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8))
    tower.save_pretrained(siglip)
    # google/siglip-so400m-patch14-384's preprocessing: bicubic, mean/std 0.5, no crop
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3, resample=3).save_pretrained(siglip)
    # the LM's tokenizer (llm-jp v1's appends its end token), written by transformers 5 for the test
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        specials = {k: v for k, v in json.load(f).items() if k in ("eos_token", "pad_token", "unk_token", "bos_token") and v}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(tokenizer_dir, "tokenizer.json"), **specials)
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, n_positions=512, vocab_size=len(tokenizer), tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():  # larger weights than the init, so answers depend on the image
        for p in lm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)

    # train_llava.py, up to the trainer
    model = LlavaGpt2ForCausalLM.from_pretrained(lm_dir)
    model.config.use_cache = False
    model_args = SimpleNamespace(vision_tower=siglip, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                                 pretrain_mm_mlp_adapter=None, mm_projector_type="mlp2x_gelu", scales=[1.0, 0.5])
    model.get_model().initialize_vision_modules(model_args=model_args)
    model.get_vision_tower().to(dtype=torch.bfloat16)  # --bf16 True
    model.config.image_aspect_ratio = "square"
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = 1532
    model.config.tune_mm_mlp_adapter = False
    with torch.no_grad():
        for p in model.get_model().mm_projector.parameters():
            p.normal_(0, 0.3)

    # stage 1's output (tune_mm_mlp_adapter): config.json + mm_projector.bin
    stage1 = os.path.join(out, "stage1")
    weights = {k: t.detach().cpu().clone() for k, t in model.named_parameters() if "mm_projector" in k}
    model.config.save_pretrained(stage1)
    torch.save(weights, os.path.join(stage1, "mm_projector.bin"))
    # stage 2's output: safe_save_model_for_hf_trainer -> Trainer._save (safetensors by default)
    stage2 = os.path.join(out, "stage2")
    model.config.use_cache = True
    state_dict = {k: v.cpu() for k, v in model.state_dict().items()}
    model.save_pretrained(stage2, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(stage2)
    del model

    # demo_llava.py on CPU
    model = LlavaGpt2ForCausalLM.from_pretrained(stage2, low_cpu_mem_usage=True, use_safetensors=True,
                                                 torch_dtype=torch.float32, device_map="cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(stage2, model_max_length=1532, padding_side="right",
                                                           use_fast=False)
    model.eval()
    conv = conv_templates["v1"].copy()
    image = probe_image()
    image.save(os.path.join(out, "probe.png"))
    vision_tower = model.get_model().vision_tower
    image_size = vision_tower.image_processor.size["height"]
    if vision_tower.scales is not None:
        image_size = vision_tower.image_processor.size["height"] * len(vision_tower.scales)
    image_tensor = vision_tower.image_processor(image, return_tensors="pt", size={"height": image_size, "width": image_size})[
        "pixel_values"].to(torch.float32)
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + QUESTION)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    input_ids = input_ids[:, :-1]  # </sep>がinputの最後に入るので削除する
    with torch.inference_mode():
        logits = model(input_ids=input_ids, images=image_tensor).logits
        generated = model.generate(inputs=input_ids, images=image_tensor, do_sample=False, max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, use_cache=True)
    tokens = generated[:, input_ids.shape[1]:] if generated.shape[1] > NEW_TOKENS else generated
    save_file({"pixel_values": image_tensor.contiguous(), "input_ids": input_ids.contiguous(),
               "logits": logits.float().contiguous(), "tokens": tokens.contiguous()},
              os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"question": QUESTION, "prompt": prompt, "transformers": transformers.__version__,
                   "tokens": tokens[0].tolist(), "text": tokenizer.decode(tokens[0])}, f, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
