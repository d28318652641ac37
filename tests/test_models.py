"""The model zoo: shapes, parameter counts, feature taps, errors and checkpoint loading."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.features import FeatureTaps, as_feature_map
from hpmkd.models import MODELS, count_params, create_model, list_models, load_state_checked, model_taps
from hpmkd.models.cnn import blocks_per_stage
from hpmkd.models.factory import timm_models, torchvision_models
from hpmkd.models.tv import InputResize, TorchvisionNet, fresh_head, replace_module, stage_taps_from_events
from hpmkd.registry import ConfigError, user_options

SHAPES = [(1, 28, 28), (3, 32, 32)]
NUM_CLASSES = 7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny batches run fastest on one thread; two OpenMP threads on a busy 2-core machine spin-wait ~50x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_model(model: nn.Module, shape: tuple[int, ...], image: bool) -> None:
    """Forward a batch of 2; every tap resolves; stage maps are 4-D (images) or [B, D] (flat-input models); the
    classifier applied to the flattened embedding gives the logits."""
    torch.manual_seed(0)
    model.eval()
    taps = model_taps(model)
    names = [*taps.feature_taps, taps.embedding_tap, taps.classifier_tap]
    with torch.no_grad(), FeatureTaps(model, names) as feats:
        logits = model(torch.randn(2, *shape))
    assert logits.shape == (2, NUM_CLASSES)
    assert taps.feature_taps or not image, "every image model declares stage taps (logistic regression has none)"
    for name in taps.feature_taps:
        assert feats[name].dim() == (4 if image else 2) and feats[name].shape[0] == 2, name
    assert torch.equal(feats[taps.classifier_tap], logits)
    classifier = model.get_submodule(taps.classifier_tap)
    with torch.no_grad():
        assert torch.allclose(classifier(feats[taps.embedding_tap].flatten(1)), logits, atol=1e-6)


#: models stacked on other models (their members are options) have no stage maps of their own: tested with them
STACKED = ("meta_mlp",)


@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("name", [n for n in MODELS.names() if n not in STACKED])
def test_every_registered_model_runs_with_working_taps(name, shape):
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=shape[0], input_shape=shape)
    flat = "input_shape" in (user_options(MODELS.get(name), ()) or ())  # mlp, logistic_regression, tabular_resnet
    check_model(model, shape, image=not flat)


@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_run_with_working_taps(name, shape):
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=shape[0], input_shape=shape)
    check_model(model, shape, image=True)
    assert model.taps.embedding_tap == "embedding"
    # weights=None, our num_classes; the only extra parameters are the 1x1 channel adapter's (c*3 + 3)
    plain = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    adapter = 0 if shape[0] == 3 else shape[0] * 3 + 3
    assert count_params(model) == count_params(plain) + adapter


def test_embedding_tap_follows_a_deep_copy():
    """The embedding is fed by a pre-hook on the classifier; a copied model must feed its own copy."""
    model = copy.deepcopy(create_model("mobilenet_v2", num_classes=NUM_CLASSES, in_channels=3))
    check_model(model, (3, 32, 32), image=True)


def test_vit_inputs_are_resized_to_its_image_size_and_taps_are_token_blocks():
    model = create_model("vit_b_32", num_classes=NUM_CLASSES, in_channels=1, input_shape=(1, 28, 28))
    assert model.resize.target(28, 28) == (224, 224)
    taps = model.taps
    assert taps.feature_taps == tuple(f"net.encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11))
    model.eval()
    with torch.no_grad(), FeatureTaps(model, [*taps.feature_taps, taps.embedding_tap]) as feats:
        logits = model(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, NUM_CLASSES)
    assert feats[taps.feature_taps[0]].shape == (2, 1 + 7 * 7, 768)  # class token + (224/32)^2 patches
    assert as_feature_map(feats[taps.feature_taps[-1]]).shape == (2, 768, 7, 7)
    with torch.no_grad():
        assert torch.allclose(model.net.heads.head(feats["embedding"]), logits, atol=1e-5)


def test_pretrained_head_replacement():
    net = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=1000)
    replace_module(net, "classifier.1", fresh_head(net.classifier[1], 5))
    assert net.classifier[1].out_channels == 5 and net.classifier[1].kernel_size == (1, 1)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    fc = fresh_head(nn.Linear(8, 1000), 3)
    assert (fc.in_features, fc.out_features) == (8, 3)


def test_torchvision_resnet_taps_are_its_stages():
    taps = create_model("resnet18", num_classes=10, in_channels=3).taps
    assert taps == ModelTaps(
        feature_taps=("net.relu", "net.layer1", "net.layer2", "net.layer3", "net.layer4"),
        embedding_tap="embedding",
        classifier_tap="net.fc",
    )


def test_small_inputs_are_upsampled_for_models_that_need_a_minimum_size():
    model = create_model("alexnet", num_classes=NUM_CLASSES, in_channels=1, input_shape=(1, 28, 28))
    assert isinstance(model, TorchvisionNet) and isinstance(model.resize, InputResize)
    assert model.resize.target(28, 28) == (63, 63)
    check_model(model, (1, 28, 28), image=True)


def test_input_resize():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    at_least = InputResize(6, exact=False)
    assert at_least(torch.zeros(1, 3, 8, 5)).shape == (1, 3, 8, 6)
    big = torch.zeros(1, 3, 9, 9)
    assert at_least(big) is big
    # exact: 4x4 -> 2x2 bilinear (align_corners=False) averages each 2x2 block: mean of [0,1,4,5] = 2.5 etc.
    small = InputResize(2, exact=True)(x)
    assert torch.allclose(small, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


def test_torchvision_name_shadowed_by_ours_gets_a_prefix():
    names = list_models()
    assert "vgg13" in names and "torchvision.vgg13" in names and "resnet18" in names
    assert torchvision_models()["torchvision.vgg13"] == "vgg13"
    assert "torchvision.resnet18" not in names
    tv_count = len(torchvision.models.list_models(module=torchvision.models))
    assert len(names) == len(set(names)) == len(MODELS.names()) + tv_count + len(timm_models())
    assert names[:len(MODELS.names()) + tv_count] == MODELS.names() + sorted(torchvision_models())


def cifar_resnet_params(depth: int, widths: tuple[int, int, int, int], classes: int, in_channels: int = 3) -> int:
    """Hand count: conv weights (no bias), BN weight+bias, 1x1 conv + BN shortcuts where the shape changes, fc."""
    n = (depth - 2) // 6
    total = 9 * in_channels * widths[0] + 2 * widths[0]
    c = widths[0]
    for stage, w in enumerate(widths[1:]):
        for b in range(n):
            total += 9 * c * w + 9 * w * w + 4 * w
            if b == 0 and (stage > 0 or c != w):  # stride 2, or a width change
                total += c * w + 2 * w
            c = w
    return total + c * classes + classes


# Exact counts with 100 classes and 3 input channels; published values (M) from RepDistiller / CRD / mdistiller.
PARAMS = {
    "resnet8": (83_892, 0.08),
    "resnet14": (181_108, 0.18),
    "resnet20": (278_324, 0.28),
    "resnet32": (472_756, 0.47),
    "resnet44": (667_188, 0.67),
    "resnet56": (861_620, 0.86),
    "resnet110": (1_736_564, 1.74),
    "resnet8x4": (1_233_540, 1.23),
    "resnet32x4": (7_433_860, 7.43),
    "wrn_16_1": (180_916, 0.18),
    "wrn_16_2": (703_284, 0.70),
    "wrn_40_1": (569_780, 0.57),
    "wrn_40_2": (2_255_156, 2.26),
    "vgg8": (3_965_028, 3.96),
    "vgg13": (9_462_180, 9.46),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_cifar_parameter_counts(name):
    exact, published = PARAMS[name]
    count = count_params(create_model(name, num_classes=100, in_channels=3))
    assert count == exact
    assert abs(count / 1e6 - published) < 0.006  # published values are rounded or truncated to 0.01 M


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56, 110])
def test_cifar_resnet_counts_match_a_hand_count(depth):
    assert PARAMS[f"resnet{depth}"][0] == cifar_resnet_params(depth, (16, 16, 32, 64), 100)
    model = create_model(f"resnet{depth}", num_classes=10, in_channels=1)
    assert count_params(model) == cifar_resnet_params(depth, (16, 16, 32, 64), 10, in_channels=1)


def test_x4_resnet_counts_match_a_hand_count():
    assert PARAMS["resnet8x4"][0] == cifar_resnet_params(8, (32, 64, 128, 256), 100)
    assert PARAMS["resnet32x4"][0] == cifar_resnet_params(32, (32, 64, 128, 256), 100)


def test_repdistiller_parameter_names():
    """Module names follow RepDistiller, so its published checkpoints load."""
    resnet = create_model("resnet8", num_classes=100, in_channels=3).state_dict()
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "layer3.0.bn2.running_var"} <= set(
        resnet
    )
    wrn = create_model("wrn_16_2", num_classes=100, in_channels=3).state_dict()
    assert {"conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.1.bn2.weight", "bn1.weight"} <= set(wrn)
    narrow = create_model("wrn_16_1", num_classes=100, in_channels=3).state_dict()
    assert "block1.layer.0.convShortcut.weight" not in narrow  # 16 -> 16 channels: identity shortcut
    vgg = create_model("vgg13", num_classes=100, in_channels=3).state_dict()
    assert {"block0.0.weight", "block0.1.running_mean", "block4.3.weight", "classifier.weight"} <= set(vgg)
    assert "block0.5.weight" not in vgg  # each block drops its last ReLU, as in RepDistiller


def test_cnn_and_mlp_parameter_counts_by_hand():
    # cnn width=4, depth=3 on 1 channel, 10 classes: stem 1->4, stage1 4->4, stage2 4->8, stage3 8->16, fc 16->10
    convs = [(1, 4), (4, 4), (4, 8), (8, 16)]
    expected = sum(9 * i * o + 2 * o for i, o in convs) + 16 * 10 + 10
    assert count_params(create_model("cnn", num_classes=10, in_channels=1, width=4, depth=3)) == expected
    model = create_model("mlp", num_classes=3, in_channels=30, input_shape=(30,), hidden=16, depth=2)
    assert count_params(model) == (30 * 16 + 16) + (16 * 16 + 16) + (16 * 3 + 3)


def test_cnn_presets_span_10k_to_2m_parameters():
    presets = ("cnn_tiny", "cnn_small", "cnn_medium", "cnn_large")
    counts = [count_params(create_model(name, num_classes=10, in_channels=1)) for name in presets]
    assert counts == [10_560, 103_466, 667_354, 1_849_530]


def test_blocks_are_spread_over_stages():
    assert blocks_per_stage(3, 3) == [1, 1, 1]
    assert blocks_per_stage(5, 3) == [2, 2, 1]
    assert blocks_per_stage(2, 3) == [1, 1]
    model = create_model("cnn", num_classes=10, in_channels=1, depth=5)
    assert model.taps.feature_taps == ("stage1", "stage2", "stage3")
    assert [len(model.get_submodule(s)) for s in model.taps.feature_taps] == [2, 2, 1]


def mlp_on_tabular(**kwargs):
    return create_model("mlp", num_classes=3, in_channels=30, input_shape=(30,), **kwargs)


def test_mlp_on_tabular_rows():
    model = mlp_on_tabular(hidden=16, depth=3)
    assert model.taps == ModelTaps(("hidden1", "hidden2", "hidden3"), "hidden3", "fc")
    with FeatureTaps(model, model.taps.feature_taps) as feats:
        assert model(torch.randn(4, 30)).shape == (4, 3)
    assert all(f.shape == (4, 16) for f in feats.values())
    logistic = mlp_on_tabular(depth=0)
    assert logistic.taps == ModelTaps((), "flatten", "fc")
    assert count_params(logistic) == 30 * 3 + 3


SCALING = [
    ("cnn", "width", [4, 8, 16, 24, 32, 64]),
    ("cnn", "depth", [1, 2, 3, 4, 5, 6, 9]),
    ("mlp", "hidden", [8, 16, 64, 256]),
    ("mlp", "depth", [0, 1, 2, 3]),
    ("resnet56", "width_mult", [0.25, 0.5, 0.75, 1.0, 1.5]),
    ("resnet56", "depth", [8, 14, 20, 56]),
    ("resnet32x4", "width_mult", [0.25, 0.5, 1.0]),
    ("wrn_40_2", "widen_factor", [0.5, 1, 1.5, 2]),
    ("wrn_40_2", "depth", [10, 16, 22, 40]),
    ("vgg8", "width_mult", [0.125, 0.25, 0.5]),
    ("vgg8", "depth", [1, 2]),
]


@pytest.mark.parametrize("name,knob,values", SCALING, ids=[f"{n}-{k}" for n, k, _ in SCALING])
def test_width_and_depth_knobs_grow_the_parameter_count(name, knob, values):
    shape = (1, 28, 28)
    counts = [count_params(create_model(name, 10, 1, input_shape=shape, **{knob: v})) for v in values]
    assert all(a < b for a, b in zip(counts, counts[1:])), counts


def test_presets_are_their_family_with_defaults():
    a = create_model("resnet56", num_classes=10, in_channels=3, width_mult=0.5)
    b = create_model("cifar_resnet", num_classes=10, in_channels=3, depth=56, width_mult=0.5)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    c = create_model("wrn_40_2", num_classes=10, in_channels=3, depth=16)
    assert count_params(c) == count_params(create_model("wrn_16_2", num_classes=10, in_channels=3))


def test_unknown_model_lists_close_names_from_ours_and_torchvision():
    with pytest.raises(ConfigError, match=r"unknown model 'wrn_40_3'.*'wrn_40_2'"):
        create_model("wrn_40_3", num_classes=10, in_channels=3)
    with pytest.raises(ConfigError, match=r"'mobilenet_v2'"):
        create_model("mobilenetv2", num_classes=10, in_channels=3)
    with pytest.raises(ConfigError) as err:
        create_model("resnet50x", num_classes=10, in_channels=3)
    assert "'resnet50'" in str(err.value) and "'resnet56'" in str(err.value)


def test_bad_options_and_shapes_are_config_errors():
    with pytest.raises(ConfigError, match=r"widht.*Did you mean 'width'"):
        create_model("cnn", num_classes=10, in_channels=1, widht=8)
    with pytest.raises(ConfigError, match=r"6n\+2"):
        create_model("resnet20", num_classes=10, in_channels=3, depth=21)
    with pytest.raises(ConfigError, match=r"image model.*\(C, H, W\).*'mlp'"):
        create_model("resnet20", num_classes=10, in_channels=30, input_shape=(30,))
    with pytest.raises(ConfigError, match=r"needs input_shape"):
        create_model("mlp", num_classes=10, in_channels=1)
    with pytest.raises(ConfigError, match=r"does not start with in_channels=3"):
        create_model("cnn", num_classes=10, in_channels=3, input_shape=(1, 28, 28))
    with pytest.raises(ConfigError, match=r"torchvision.*rejected"):
        create_model("resnet18", num_classes=10, in_channels=3, no_such_option=1)


def test_load_state_checked_names_the_layer_that_does_not_fit():
    source = create_model("cnn", num_classes=10, in_channels=1, width=4)
    target = create_model("cnn", num_classes=10, in_channels=1, width=4)
    load_state_checked(target, source.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))

    other_classes = create_model("cnn", num_classes=5, in_channels=1, width=4).state_dict()
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \[5, 16\] in the checkpoint but \[10, 16\].*differ"):
        load_state_checked(target, other_classes)
    missing = {k: v for k, v in source.state_dict().items() if k != "stage2.0.1.weight"}
    with pytest.raises(ValueError, match=r"'stage2.0.1.weight' \(shape \[8\]\) is missing"):
        load_state_checked(target, missing)
    extra = {**source.state_dict(), "head.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"checkpoint has a layer 'head.weight' that the model does not have"):
        load_state_checked(target, extra)


def test_count_params_trainable_only():
    model = create_model("cnn", num_classes=10, in_channels=1, width=4)
    model.fc.requires_grad_(False)
    assert count_params(model) - count_params(model, trainable_only=True) == 16 * 10 + 10


def test_model_taps_needs_metadata():
    with pytest.raises(ValueError, match="model.taps"):
        model_taps(nn.Linear(2, 2))


def test_stage_taps_from_probe_events():
    """A hand-made trace: a stem at 16x16, a spanning container whose children are at 16 and 8, a 2x2 stage whose
    nested branch finishes later, a 1x1 pool, an adaptive pool back up to 4x4, then the classifier."""
    events = [
        ("start", "stem", None), ("end", "stem", (16, 16)),
        ("start", "features", None),
        ("start", "features.0", None), ("end", "features.0", (16, 16)),
        ("start", "features.1", None), ("end", "features.1", (8, 8)),
        ("end", "features", (8, 8)),  # spans 16 and 8: not a tap
        ("start", "mixed", None), ("end", "mixed", (2, 2)),
        ("start", "down", None),
        ("start", "down.branch", None), ("end", "down.branch", (2, 2)),  # nested deeper than "mixed": not chosen
        ("end", "down", None),
        ("start", "pool", None), ("end", "pool", (1, 1)),
        ("start", "adaptive", None), ("end", "adaptive", (4, 4)),  # larger than 2x2 seen before: skipped
        ("stop", "", None),
        ("start", "head", None), ("end", "head", (3, 3)),
    ]
    # 16x16: "stem" and "features.0" both qualify; "stem" is less deeply nested
    assert stage_taps_from_events(events) == ("stem", "features.1", "mixed")


def test_cnn_stem_stride_keeps_parameters_and_quarters_the_maps():
    plain = create_model("cnn_small", num_classes=10, in_channels=1, input_shape=(1, 28, 28))
    strided = create_model("cnn_small", num_classes=10, in_channels=1, input_shape=(1, 28, 28), stem_stride=2)
    assert count_params(plain) == count_params(strided) == 103_466
    x = torch.randn(2, 1, 28, 28)
    with FeatureTaps(strided, ["stage1"]) as feats:
        assert strided(x).shape == (2, 10)
    assert feats["stage1"].shape[-2:] == (14, 14)
