"""Import of a checkpoint written by LLaVA-JP v1.1's own code, against its own forward.

The checkpoint and the reference outputs come from `tests/fakes/llava_jp_v1_1/write_fixture.py`,
which runs the predecessor's unmodified code under transformers 4.40 (its era: tower keys
`model.vision_tower.vision_tower.vision_model.*`, tower saved in bf16, PIL resizing). It needs
a Python with transformers 4.40: `LLAVA_JP_PREDECESSOR_PYTHON` (set by
`.ci/extra/30-predecessor.sh`), else `/work/venvs/tf440/bin/python` when present; skipped
without one.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_jp.hub.import_v1 import convert
from llava_jp.infer.load import load_model

FIXTURE = Path(__file__).parent / "fakes" / "llava_jp_v1_1" / "write_fixture.py"
PYTHON = os.environ.get("LLAVA_JP_PREDECESSOR_PYTHON") or "/work/venvs/tf440/bin/python"


@pytest.fixture(scope="module")
def predecessor(tmp_path_factory):
    if not Path(PYTHON).exists():
        pytest.skip(f"no transformers 4.40 Python at {PYTHON} (set LLAVA_JP_PREDECESSOR_PYTHON)")
    from tests.test_import_llava_jp import _eos_appending_tokenizer

    root = tmp_path_factory.mktemp("predecessor")
    _eos_appending_tokenizer().save_pretrained(root / "tokenizer")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([PYTHON, str(FIXTURE), str(root / "out"), str(root / "tokenizer")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = root / "out"
    return out, load_file(out / "reference.safetensors")


def test_a_checkpoint_written_by_the_predecessor_imports_and_matches_its_forward(predecessor, tmp_path):
    # item 3: its 4.x tower keys failed to import; its PIL resizing differed from ours
    out, ref = predecessor
    convert(str(out / "stage2"), tmp_path / "imported", vision_tower=str(out / "siglip"))
    model, processor = load_model(tmp_path / "imported")  # the choice of PIL survives save/load
    model.eval()
    assert type(processor.image_processor).__name__ == "SiglipImageProcessorPil"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    image = Image.open(out / "probe.png")
    batch = processor(text=["猫の隣には何がありますか？"], images=[image])
    assert torch.equal(batch["pixel_values"], ref["pixel_values"])
    expected_ids = []
    for token in ref["input_ids"][0].tolist():
        expected_ids += [processor.image_token_id] * model.num_image_tokens if token == -200 else [token]
    assert batch["input_ids"][0].tolist() == expected_ids
    with torch.no_grad():
        logits = model(**batch).logits
    diff = (logits - ref["logits"]).abs().max().item()
    print(f"predecessor fixture: max |logit diff| {diff:.3g}")
    assert diff < 1e-4
    tokens = model.generate(**batch, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert tokens.tolist() == ref["tokens"].tolist()


def test_its_stage1_projector_imports(predecessor, tmp_path):
    out, _ = predecessor
    model, _ = convert(str(out / "stage1"), tmp_path / "stage1", vision_tower=str(out / "siglip"),
                       language_model=str(out / "lm"))
    saved = torch.load(out / "stage1" / "mm_projector.bin", weights_only=True)
    for key, tensor in saved.items():
        assert torch.equal(model.state_dict()[key.replace("model.mm_projector.", "multi_modal_projector.")], tensor)
    stage2 = load_file(out / "stage2" / "model.safetensors")
    assert torch.equal(model.language_model.lm_head.weight, stage2["lm_head.weight"])
