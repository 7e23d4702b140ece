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
