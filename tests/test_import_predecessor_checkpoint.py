"""`llava-jp import-llava-jp` on checkpoints laid out as LLaVA-JP v1.1's own code wrote them
(tests/fakes/llava_jp_v1_1.py: transformers 4.x tower keys, bf16 tower, 4.40 shards, stage-1
`mm_projector.bin`), against the predecessor's forward rebuilt here from transformers' own
components: `SiglipVisionModel`, `GPT2LMHeadModel`, the 2-layer MLP projector, its S2 tiling
(s2wrapper) and its PIL preprocessing (transformers 4.x `SiglipImageProcessor`). No llava-jp
code is on the reference path.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_jp import LlavaJpForConditionalGeneration, LlavaJpProcessor
from llava_jp.cli import main as cli_main
from tests.fakes.llava_jp_v1_1 import SYSTEM, write_llava_jp_v1_1

QUESTION = "猫の隣には何がありますか？"
# LLaVA-JP v1.1's conv_templates["v1"] (SeparatorStyle.TWO, sep " ") with the question and the
# empty assistant turn, as its demo_llava.py builds it
PROMPT = f"{SYSTEM} ユーザー: <image>\n{QUESTION} システム: "
IMAGE_TOKEN_INDEX = -200
NEW_TOKENS = 8
TOWER_KEYS = "model.vision_tower.vision_tower.vision_model."


# -- the predecessor's forward, from transformers components -----------------------------------
def predecessor_pixels(image: Image.Image, size: int, processor_config: dict) -> torch.Tensor:
    """transformers 4.40's SiglipImageProcessor at the S2 input size: PIL resize of the uint8
    image, rescale in float64 then float32, normalize, channels first."""
    resized = np.asarray(image.convert("RGB").resize((size, size), resample=processor_config["resample"]))
    x = (resized.astype(np.float64) * processor_config["rescale_factor"]).astype(np.float32)
    x = (x - np.array(processor_config["image_mean"], dtype=np.float32)) / np.array(processor_config["image_std"], dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def prompt_ids(tokenizer_file) -> list[int]:
    """Its tokenizer_image_token: each chunk around `<image>` encoded with the tokenizer's
    special tokens (llm-jp v1 appends its end token), -200 between, the final token cut off."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    before, after = (tokenizer.encode(chunk).ids for chunk in PROMPT.split("<image>"))
    return (before + [IMAGE_TOKEN_INDEX] + after)[:-1]


class PredecessorForward:
    """LlavaGpt2ForCausalLM's forward (CPU demo: everything in float32)."""

    def __init__(self, config: dict, lm_state: dict, tower_state: dict, projector_state: dict, siglip_dir):
        siglip = json.loads((siglip_dir / "config.json").read_text())
        self.tower = SiglipVisionModel(SiglipVisionConfig(**siglip["vision_config"])).eval()
        installed = self.tower.state_dict()
        if "vision_model.post_layernorm.weight" in installed:  # transformers < 5.6 keeps the level
            tower_state = {f"vision_model.{k}": v for k, v in tower_state.items()}
        self.tower.load_state_dict({k: v.float() for k, v in tower_state.items()}, strict=True)
        text = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
        self.lm = GPT2LMHeadModel(GPT2Config(**text)).eval()
        self.lm.load_state_dict({k: v.float() for k, v in lm_state.items()}, strict=True)
        assert config["mm_projector_type"] == "mlp2x_gelu"
        self.projector = nn.Sequential(nn.Linear(config["mm_hidden_size"], config["n_embd"]), nn.GELU(),
                                       nn.Linear(config["n_embd"], config["n_embd"]))
        self.projector.load_state_dict({k: v.float() for k, v in projector_state.items()}, strict=True)
        self.scales, self.layer = config["scales"], config["mm_vision_select_layer"]

    def _crop_features(self, x):
        # CLIPVisionTower.feature_select, "patch": drops token 0 (SigLIP has no CLS: a patch)
        return self.tower(x, output_hidden_states=True).hidden_states[self.layer][:, 1:]

    def image_features(self, pixels):
        """s2wrapper.forward(scales, max_split_size=tower size, num_prefix_token=0)."""
        size, split = pixels.shape[-1], self.tower.config.image_size
        outs, splits = [], []
        for scale in self.scales:
            side = int(size * scale)
            n = math.ceil(side / split)
            x = F.interpolate(pixels.float(), size=side, mode="bicubic")
            step = side // n
            x = torch.cat([x[..., i * step:(i + 1) * step, j * step:(j + 1) * step] for i in range(n) for j in range(n)])
            outs.append(self._crop_features(x))
            splits.append(n)
        tokens = outs[0].shape[1]
        height = int(tokens ** 0.5)
        width = height if height * height == tokens else tokens // height
        merged = []
        for out, n in zip(outs, splits):
            grid = out.reshape(out.shape[0], height, width, -1).permute(0, 3, 1, 2)
            b = grid.shape[0] // n ** 2
            grid = torch.cat([torch.cat([grid[(i * n + j) * b:(i * n + j + 1) * b] for j in range(n)], dim=-1)
                              for i in range(n)], dim=-2)
            merged.append(F.interpolate(grid, size=[height, width], mode="area"))
        return torch.cat(merged, dim=1).flatten(2).transpose(1, 2)

    def embeds(self, ids: list[int], pixels):
        at = ids.index(IMAGE_TOKEN_INDEX)
        wte = self.lm.transformer.wte
        features = self.projector(self.image_features(pixels))[0]
        return torch.cat([wte(torch.tensor(ids[:at])), features, wte(torch.tensor(ids[at + 1:]))])[None]

    @torch.no_grad()
    def logits(self, ids, pixels):
        return self.lm(inputs_embeds=self.embeds(ids, pixels)).logits

    @torch.no_grad()
    def greedy(self, ids, pixels, eos: int) -> list[int]:
        """generate(do_sample=False, min_new_tokens=max_new_tokens=NEW_TOKENS)."""
        embeds, tokens = self.embeds(ids, pixels), []
        for _ in range(NEW_TOKENS):
            last = self.lm(inputs_embeds=embeds).logits[0, -1]
            last[eos] = -math.inf
            tokens.append(int(last.argmax()))
            embeds = torch.cat([embeds, self.lm.transformer.wte(torch.tensor([[tokens[-1]]]))], dim=1)
        return tokens


def _weights(folder) -> dict:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    state = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state |= load_file(folder / shard)
    return state


def _split(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# -- the import, compared ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def predecessor(tmp_path_factory):
    return write_llava_jp_v1_1(tmp_path_factory.mktemp("llava_jp_v1_1"))


def _compare(out, reference: PredecessorForward, tokenizer_file, image_path, siglip_dir):
    """Our imported model against the reference: same pixels, same prompt ids, logits within
    1e-4, the same greedy tokens."""
    model = LlavaJpForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = LlavaJpProcessor.from_pretrained(out)  # the PIL choice must survive save/load
    image = Image.open(image_path)
    preprocessing = json.loads((siglip_dir / "preprocessor_config.json").read_text())
    size = preprocessing["size"]["height"] * len(reference.scales)  # demo_llava.py's input size
    pixels = predecessor_pixels(image, size, preprocessing)
    ids = prompt_ids(tokenizer_file)
    batch = processor(text=[QUESTION], images=[image])
    assert torch.equal(batch["pixel_values"], pixels)
    expected = []
    for token in ids:
        expected += [processor.image_token_id] * model.num_image_tokens if token == IMAGE_TOKEN_INDEX else [token]
    assert batch["input_ids"][0].tolist() == expected
    ref_logits = reference.logits(ids, pixels)
    with torch.no_grad():
        logits = model(**batch).logits[..., :ref_logits.shape[-1]]  # `<image>` grew the vocabulary by one
    diff = (logits - ref_logits).abs().max().item()
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    ref_tokens = reference.greedy(ids, pixels, eos)
    generated = model.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    tokens = generated[0, batch["input_ids"].shape[1]:].tolist()
    print(f"max |logit diff| {diff:.3g}; tokens ours {tokens} predecessor {ref_tokens}")
    assert diff <= 1e-4
    assert tokens == ref_tokens
    # the bound can see preprocessing: torch's bicubic resize (what the import used to run) is off by far more
    tensor = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy())[None] / 255
    torch_resized = (F.interpolate(tensor, size=size, mode="bicubic", antialias=True) - 0.5) / 0.5
    assert (reference.logits(ids, torch_resized) - ref_logits).abs().max() > 1e-3


def test_released_checkpoint_imports_and_matches_the_predecessors_forward(predecessor, tmp_path):
    # item 3: its 4.x tower keys (`...vision_tower.vision_model.*`) and bf16 tower did not
    # import; its PIL resizing was replaced by torchvision's
    out = tmp_path / "imported"
    assert cli_main(["import-llava-jp", "--src", str(predecessor.stage2), "--out", str(out),
                     "--vision-tower", str(predecessor.siglip)]) == 0
    state = _weights(predecessor.stage2)
    assert {t.dtype for k, t in state.items() if k.startswith(TOWER_KEYS)} == {torch.bfloat16}
    config = json.loads((predecessor.stage2 / "config.json").read_text())
    lm_state = {k: v for k, v in state.items() if k.startswith(("transformer.", "lm_head."))}
    reference = PredecessorForward(config, lm_state, _split(state, TOWER_KEYS), _split(state, "model.mm_projector."),
                                   predecessor.siglip)
    _compare(out, reference, predecessor.stage2 / "tokenizer.json", predecessor.image, predecessor.siglip)


def test_stage1_projector_imports_with_the_published_lm_and_tower(predecessor, tmp_path):
    # item 3: stage 1's config names GPT2LMHeadModel (saved before any model save)
    out = tmp_path / "stage1"
    assert cli_main(["import-llava-jp", "--src", str(predecessor.stage1), "--out", str(out),
                     "--vision-tower", str(predecessor.siglip), "--language-model", str(predecessor.lm)]) == 0
    config = json.loads((predecessor.stage1 / "config.json").read_text())
    projector = torch.load(predecessor.stage1 / "mm_projector.bin", weights_only=True)
    reference = PredecessorForward(config, load_file(predecessor.lm / "model.safetensors"),
                                   _split(load_file(predecessor.siglip / "model.safetensors"), "vision_model."),
                                   _split(projector, "model.mm_projector."), predecessor.siglip)
    _compare(out, reference, predecessor.lm / "tokenizer.json", predecessor.image, predecessor.siglip)
