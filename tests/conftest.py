import json

import pytest
import torch

from llava_jp.presets.builder import build
from llava_jp.synthetic import write_dataset


@pytest.fixture()
def tiny():
    """A fresh tiny (model, processor) with random weights, seeded."""
    torch.manual_seed(0)
    model, processor = build("tiny", pretrained=False)
    return model.eval(), processor


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny model + processor saved to disk, loaded as a user would load a release."""
    torch.manual_seed(0)
    model, processor = build("tiny", pretrained=False)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_modules_cache(tmp_path_factory):
    """Remote code that child processes load goes to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        yield


@pytest.fixture(scope="session")
def train_workspace(tmp_path_factory):
    """A saved tiny base model and a small synthetic dataset with some text-only samples."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    model, processor = build("tiny", pretrained=False)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    paths = write_dataset(root / "data", n_train=48, n_test=0, seed=0)
    rows = json.loads(paths["stage2"].read_text(encoding="utf-8"))
    rows += [{"id": f"t{i}", "conversations": [{"from": "ユーザー", "value": "こんにちは"},
                                               {"from": "システム", "value": "こんにちは！" * (i % 3 + 1)}]}
             for i in range(16)]
    (root / "data" / "mixed.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return {"root": root, "base": root / "base", "images": paths["images"], "stage1": paths["stage1"],
            "stage2": paths["stage2"], "mixed": root / "data" / "mixed.json"}
