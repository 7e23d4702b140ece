"""Token compression before the projector (`projector_pixel_shuffle`), off by default."""

import pytest
import torch

from llava_jp import LlavaJpForConditionalGeneration
from llava_jp.core.configuration import LlavaJpConfig
from llava_jp.core.projector import merged_tokens, pixel_shuffle
from llava_jp.presets.builder import build, load_preset


def test_pixel_shuffle_puts_each_2x2_block_of_neighbours_into_one_token():
    g, c = 4, 3
    grid = torch.arange(g * g * c, dtype=torch.float).reshape(1, g * g, c)
    out = pixel_shuffle(grid, 2)
    assert out.shape == (1, 4, 12)
    # token 0 = grid cells (0,0), (0,1), (1,0), (1,1), channels concatenated
    expected = torch.cat([grid[0, 0], grid[0, 1], grid[0, g], grid[0, g + 1]])
    torch.testing.assert_close(out[0, 0], expected)
    assert pixel_shuffle(grid, 1) is grid


def test_odd_grid_is_zero_padded_729_to_196():
    assert merged_tokens(729, 2) == 196 and merged_tokens(729, 3) == 81 and merged_tokens(16, 2) == 4
    features = torch.ones(2, 729, 5)
    out = pixel_shuffle(features, 2)
    assert out.shape == (2, 196, 20)
    # the last token of the first row covers column 26 and the padding column 27
    last_in_row = out[0, 13].reshape(2, 2, 5)
    assert last_in_row[:, 0].eq(1).all() and last_in_row[:, 1].eq(0).all()


def test_compressed_model_trains_and_round_trips(tmp_path):
    import dataclasses

    preset = dataclasses.replace(load_preset("tiny"), projector_pixel_shuffle=2)
    torch.manual_seed(0)
    model, processor = build(preset, pretrained=False)
    plain, _ = build("tiny", pretrained=False)
    assert plain.config.projector_pixel_shuffle == 1 and plain.num_image_tokens == 16
    assert model.num_image_tokens == 4 and model.num_vision_tokens == 16
    assert model.projector_input_width == 4 * plain.projector_input_width
    assert processor.num_image_tokens == 4
    from PIL import Image

    messages = [{"role": "user", "content": "<image>\n何色?"}, {"role": "assistant", "content": "赤"}]
    enc = processor.encode_conversation(messages)
    assert enc["input_ids"].count(model.config.image_token_id) == 4
    batch = {"input_ids": torch.tensor([enc["input_ids"]]), "labels": torch.tensor([enc["labels"]]),
             "pixel_values": processor.preprocess_images([Image.new("RGB", (50, 40), "red")])}
    loss = model(**batch).loss
    loss.backward()
    assert model.multi_modal_projector[0].weight.grad is not None
    model.save_pretrained(tmp_path)
    again = LlavaJpForConditionalGeneration.from_pretrained(tmp_path)
    assert again.config.projector_pixel_shuffle == 2 and again.num_image_tokens == 4
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).loss, model(**batch).loss)


def test_bad_factor_and_v1_layout_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="projector_pixel_shuffle"):
        LlavaJpConfig(projector_pixel_shuffle=0)
    with pytest.raises(ValueError, match="projector_pixel_shuffle"):
        LlavaJpConfig(projector_pixel_shuffle=2, vision_layout="llava-jp-v1.1-compat")
