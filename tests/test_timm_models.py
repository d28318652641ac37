"""timm models by name (CPU-sized Swin, ViT and MobileViT), their channels-first feature taps, local weight files and
the model listing; torchvision's ``checkpoint`` option."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from hpmkd.features import FeatureTaps
from hpmkd.models import create_model, list_models
from hpmkd.models.factory import timm_models, torchvision_models
from hpmkd.models.ref import DataShape, ModelRef
from hpmkd.models.timm_models import TimmNet, to_map
from hpmkd.registry import ConfigError

SWIN = ModelRef("swin_tiny_patch4_window7_224",
                {"patch_size": 2, "window_size": 7, "embed_dim": 16, "depths": [1, 1, 1], "num_heads": [1, 2, 4]})
VIT = ModelRef("vit_base_patch16_224", {"patch_size": 4, "embed_dim": 24, "depth": 8, "num_heads": 2,
                                        "reg_tokens": 2})
MOBILEVIT = ModelRef("mobilevit_xxs", {"width_factor": 0.25})
SHAPE = DataShape(5, (1, 28, 28))


def run_taps(ref: ModelRef, shape: DataShape = SHAPE) -> tuple[torch.nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = ref.build(shape).eval()
    taps = model.taps
    with torch.no_grad(), FeatureTaps(model, [*taps.feature_taps, taps.embedding_tap]) as feats:
        logits = model(torch.randn(2, *shape.input_shape))
    return model, logits, dict(feats)


def test_swin_stages_are_tapped_channels_first_at_each_resolution():
    model, logits, feats = run_taps(SWIN)
    assert logits.shape == (2, 5)
    # 28 px / patch 2 = 14x14 tokens, halved by each patch merging (7x7, then 4x4 with padding); widths 16, 32, 64
    assert [tuple(feats[t].shape) for t in model.taps.feature_taps] == [(2, 16, 14, 14), (2, 32, 7, 7), (2, 64, 4, 4)]
    # the tap is the stage's own [B, H, W, C] output, permuted
    stage = {}
    handle = model.net.layers[1].register_forward_hook(lambda m, a, out: stage.setdefault("out", out))
    with torch.no_grad(), FeatureTaps(model, ["maps.1"]) as again:
        model(torch.randn(2, 1, 28, 28))
    handle.remove()
    assert torch.equal(again["maps.1"], stage["out"].permute(0, 3, 1, 2))
    assert torch.allclose(model.get_submodule(model.taps.classifier_tap)(feats["embedding"]), logits, atol=1e-5)


def test_vit_taps_four_evenly_spaced_blocks_without_prefix_tokens():
    model, logits, feats = run_taps(VIT)
    assert model.net.num_prefix_tokens == 3  # class token + 2 register tokens
    hooked = [model.net.blocks[i] for i in (1, 3, 5, 7)]  # blocks L/4, L/2, 3L/4, L of L = 8
    tokens = {}
    handles = [b.register_forward_hook(lambda m, a, out, i=i: tokens.setdefault(i, out)) for i, b in enumerate(hooked)]
    with torch.no_grad(), FeatureTaps(model, list(model.taps.feature_taps)) as again:
        model(torch.randn(2, 1, 28, 28))
    for h in handles:
        h.remove()
    for i, tap in enumerate(model.taps.feature_taps):
        assert again[tap].shape == (2, 24, 7, 7)
        # token (row r, column c) of the 7x7 patch grid, after the 3 prefix tokens, is map position [r, c]
        assert torch.equal(again[tap][:, :, 2, 5], tokens[i][:, 3 + 2 * 7 + 5])
    assert feats["embedding"].shape == (2, 24) and logits.shape == (2, 5)


def test_mobilevit_taps_its_stages():
    model, logits, feats = run_taps(MOBILEVIT)
    shapes = [tuple(feats[t].shape) for t in model.taps.feature_taps]
    assert [s[2:] for s in shapes] == [(14, 14), (7, 7), (4, 4), (2, 2), (1, 1)]  # strides 2, 4, 8, 16, 32
    assert all(len(s) == 4 for s in shapes) and logits.shape == (2, 5)


def test_fixed_size_transformers_are_built_for_the_data_and_taps_follow_a_copy():
    model = VIT.build(DataShape(3, (3, 32, 48)))
    assert tuple(model.net.patch_embed.img_size) == (32, 48)
    copied = copy.deepcopy(model).eval()
    with torch.no_grad(), FeatureTaps(copied, ["maps.0"]) as feats:
        copied(torch.randn(1, 3, 32, 48))
    assert feats["maps.0"].shape == (1, 24, 8, 12)  # a rectangular patch grid
    assert ModelRef(VIT.model, {**VIT.options, "img_size": 16}).build(SHAPE).net.patch_embed.img_size == (16, 16)


def test_tokens_on_a_grid_that_does_not_fit_are_an_error():
    with pytest.raises(ValueError, match="do not fill"):
        to_map(torch.zeros(1, 1 + 7, 4), "tokens", prefix=1, grid=None)


def test_timm_names_are_listed_after_ours_and_torchvision_with_a_prefix_where_taken():
    names = list_models()
    timm_names = timm_models()
    assert "mobilevit_s" in names and "swin_tiny_patch4_window7_224" in names and "vit_base_patch16_224" in names
    assert "timm.resnet18" in names and timm_names["timm.resnet18"] == "resnet18" and "resnet18" in torchvision_models()
    assert "timm.vgg13" in names  # ours is vgg13
    assert len(names) == len(set(names))
    model = create_model("timm.resnet18", num_classes=3, in_channels=1, input_shape=(1, 32, 32))
    assert isinstance(model, TimmNet) and model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    with pytest.raises(ConfigError, match=r"model 'vit_base_patch16_224' \(timm\) rejected its options"):
        create_model("vit_base_patch16_224", num_classes=3, in_channels=1, input_shape=(1, 28, 28), embed_dims=8)
    with pytest.raises(ConfigError, match="Did you mean .*'mobilevit_s'"):
        create_model("mobilevit_ss", num_classes=3, in_channels=1)


def test_a_local_checkpoint_loads_weights_only_with_a_fresh_head(tmp_path):
    torch.manual_seed(1)
    source = create_model(VIT.model, num_classes=1000, in_channels=3, input_shape=(3, 28, 28), **VIT.options)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(path))
    loaded = create_model(VIT.model, num_classes=4, in_channels=3, input_shape=(3, 28, 28), checkpoint=str(path),
                          **VIT.options)
    for key, value in source.net.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(loaded.net.state_dict()[key], value), key
    assert loaded.net.head.out_features == 4
    torch.save({"state_dict": source.net.state_dict()}, tmp_path / "vit.pth")  # a torch file, read weights-only
    again = create_model(VIT.model, num_classes=4, in_channels=3, input_shape=(3, 28, 28),
                         checkpoint=str(tmp_path / "vit.pth"), **VIT.options)
    assert torch.equal(again.net.blocks[0].attn.qkv.weight, source.net.blocks[0].attn.qkv.weight)
    with pytest.raises(ConfigError, match="could not load checkpoint"):
        create_model(VIT.model, num_classes=4, in_channels=3, input_shape=(3, 28, 28),
                     checkpoint=str(tmp_path / "missing.pth"), **VIT.options)
    # shapes only: a model built on the meta device loads nothing
    assert ModelRef(VIT.model, {**VIT.options, "checkpoint": str(tmp_path / "missing.pth")}).count_params(
        DataShape(4, (3, 28, 28))) == sum(p.numel() for p in loaded.parameters())


def test_torchvision_checkpoint_option_keeps_the_weights_and_replaces_a_head_that_does_not_fit(tmp_path):
    torch.manual_seed(2)
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    model = create_model("resnet18", num_classes=6, in_channels=3, checkpoint=str(path))
    assert torch.equal(model.net.layer3[0].conv1.weight, net.layer3[0].conv1.weight)
    assert model.net.fc.out_features == 6
    with pytest.raises(ConfigError, match="does not fit"):
        create_model("resnet34", num_classes=6, in_channels=3, checkpoint=str(path))
