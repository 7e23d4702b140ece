import pytest
import torch

from llava_jp.builder import build


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
