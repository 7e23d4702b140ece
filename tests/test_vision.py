import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel, TimmWrapperConfig

from llava_jp.core import vision
from llava_jp.presets.builder import build
from llava_jp.core.configuration import LlavaJpConfig
from llava_jp.core.modeling import LlavaJpForConditionalGeneration


def _siglip(image_size=32, patch=8, layers=3, hidden=32):
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=2, image_size=image_size, patch_size=patch)
    return SiglipVisionModel(config).eval()


def test_siglip_384_keeps_all_729_patch_tokens():
    tower = _siglip(image_size=384, patch=14, layers=1, hidden=16)
    feats = vision.crop_features(tower, torch.randn(1, 3, 384, 384), feature_layer=-1)
    assert feats.shape == (1, 729, 16)


def test_features_equal_hidden_states_of_feature_layer():
    tower = _siglip()
    x = torch.randn(2, 3, 32, 32)
    ref = tower(x, output_hidden_states=True).hidden_states
    for layer in (-2, 1, 2):
        torch.testing.assert_close(vision.crop_features(tower, x, layer), ref[layer])


def test_layers_past_feature_layer_are_not_run():
    tower = _siglip(layers=3)
    calls = []
    for i, layer in enumerate(tower.encoder.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.append(i))
    head_calls = []
    tower.head.register_forward_hook(lambda *a: head_calls.append(1))
    tower.post_layernorm.register_forward_hook(lambda *a: head_calls.append(1))
    vision.crop_features(tower, torch.randn(1, 3, 32, 32), feature_layer=-2)
    assert calls == [0, 1] and head_calls == []
    assert {id(p) for p in vision.unused_parameters(tower, -2)} == {
        id(p) for m in (tower.encoder.layers[2], tower.post_layernorm, tower.head) for p in m.parameters()
    }


def _patch_identity_tower(image_size=32, patch=8, hidden=16):
    """A SigLIP whose output at each token is a function of its own patch only: position
    embeddings and every layer's residual branches zeroed, patch embedding = mean brightness."""
    tower = _siglip(image_size=image_size, patch=patch, layers=2, hidden=hidden)
    with torch.no_grad():
        for p in tower.parameters():
            p.zero_()
        tower.embeddings.patch_embedding.weight[:, 0] = 1.0 / (patch * patch)
    return tower


@pytest.mark.parametrize("row,col", [(0, 0), (1, 6), (5, 2), (7, 7), (3, 4)])
def test_s2_puts_an_image_feature_at_the_matching_token(row, col):
    # 64 px image, S2 scales [32, 64], split 32: scale 64 = 2x2 crops of 4x4 patches -> an
    # 8x8 high-res grid, area-pooled to 4x4. A bright 8x8 patch at high-res grid (row, col)
    # must light up token (row // 2) * 4 + col // 2 in the high-res channels, and nothing else.
    tower = _patch_identity_tower()
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = 1.0
    with torch.no_grad():
        feats = vision.image_features(tower, image, feature_layer=-1, s2_scales=[32, 64], s2_split_size=32)
    assert feats.shape == (1, 16, 32)
    high_res = feats[0, :, 16:].mean(-1)
    expected = (row // 2) * 4 + col // 2
    assert int(high_res.argmax()) == expected
    assert high_res[expected] == pytest.approx(0.25, abs=1e-5)  # one of 4 pooled cells lit
    others = torch.cat([high_res[:expected], high_res[expected + 1:]])
    assert torch.all(others.abs() < 1e-6)


def test_s2_on_the_full_size_grid_is_27x27():
    tower = _siglip(image_size=384, patch=14, layers=1, hidden=8)
    feats = vision.image_features(tower, torch.randn(1, 3, 768, 768), -1, s2_scales=[384, 768], s2_split_size=384)
    assert feats.shape == (1, 729, 16)


def test_timm_tower_through_the_same_interface():
    timm_config = TimmWrapperConfig(
        architecture="vit_so400m_patch14_siglip_384",
        model_args={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "mlp_ratio": 2},
        num_labels=0,
    )
    text = LlavaJpConfig().text_config.to_dict() | {"n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 50}
    config = LlavaJpConfig(vision_config=timm_config, text_config=text, s2_scales=[32, 64], s2_split_size=32)
    model = LlavaJpForConditionalGeneration(config).eval()
    assert model.num_image_tokens == 16 and model.projector_input_width == 64
    ref = model.vision_tower.timm_model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True,
                                                             output_fmt="NLC")
    assert len(ref) == 3
    x = torch.randn(2, 3, 32, 32)
    expected = model.vision_tower.timm_model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(vision.crop_features(model.vision_tower, x, -2), expected)
    assert model.get_image_features(torch.randn(2, 3, 64, 64)).shape == (2, 16, 32)


def test_frozen_tower_builds_no_autograd_graph(tiny):
    model, _ = tiny
    model.vision_tower.requires_grad_(False)
    feats = vision.image_features(model.vision_tower, torch.randn(1, 3, 64, 64), -2, [32, 64], 32)
    with torch.enable_grad():
        projected = model.get_image_features(torch.randn(1, 3, 64, 64))
    assert projected.requires_grad  # the projector trains
    assert projected.grad_fn is not None
    # the graph stops at the projector: nothing inside reaches the tower
    seen, stack = set(), [projected.grad_fn]
    names = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert "ConvolutionBackward0" not in names and feats.grad_fn is None


def test_trainable_tower_gets_gradients(tiny):
    model, _ = tiny
    model.freeze_unused_vision_parameters()
    with torch.enable_grad():
        model.get_image_features(torch.randn(1, 3, 64, 64)).sum().backward()
    assert model.vision_tower.embeddings.patch_embedding.weight.grad is not None
    head = getattr(model.vision_tower, "head", None)  # dropped where transformers honours vision_use_head=False
    assert head is None or (head.probe.grad is None and not head.probe.requires_grad)
