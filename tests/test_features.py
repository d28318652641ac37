"""Feature taps (forward hooks) and adapters, checked against tensors computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hpmkd.features import (
    ADAPTERS,
    ConvReg,
    FeatureTaps,
    as_feature_map,
    conv1x1_adapter,
    linear_adapter,
    make_adapter,
)
from hpmkd.registry import ConfigError


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_taps_capture_the_named_outputs_and_remove_their_hooks():
    model = tiny_mlp()
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    w0, b0 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    hidden = x.numpy() @ w0.T + b0
    taps = FeatureTaps(model, ["0", "1"])
    with taps.capture() as feats:
        logits = model(x)
        assert taps.attached
    np.testing.assert_allclose(feats["0"].detach().numpy(), hidden, rtol=1e-6)
    np.testing.assert_allclose(feats["1"].detach().numpy(), np.maximum(hidden, 0), rtol=1e-6)
    assert feats["1"].requires_grad  # the graph is kept for the loss
    assert not taps.attached
    assert all(not m._forward_hooks for m in model.modules())
    before = feats["0"].clone()
    model(x * 2)  # no hooks any more: the captured dict is untouched
    torch.testing.assert_close(feats["0"], before)
    with taps.capture() as second:
        model(x * 2)
    assert second is not feats
    np.testing.assert_allclose(second["0"].detach().numpy(), (2 * x.numpy()) @ w0.T + b0, rtol=1e-5)
    assert logits.shape == (2, 2)


def test_taps_as_context_manager_and_gradients_flow():
    model = tiny_mlp()
    x = torch.ones(1, 3)
    with FeatureTaps(model, ["1"]) as feats:
        model(x)
    feats["1"].sum().backward()
    assert model[0].weight.grad is not None
    assert all(not m._forward_hooks for m in model.modules())


def test_unknown_tap_name_lists_the_available_modules():
    model = tiny_mlp()
    with pytest.raises(ConfigError) as err:
        FeatureTaps(model, ["0", "fc"])
    message = str(err.value)
    assert "'fc'" in message and "Available module names: 0, 1, 2" in message


def test_tuple_output_module_gives_its_first_tensor():
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, x - 1

    model = nn.Sequential(Pair())
    with FeatureTaps(model, ["0"]).capture() as feats:
        model(torch.zeros(2))
    np.testing.assert_array_equal(feats["0"].numpy(), np.ones(2))


def test_taps_are_not_reentrant():
    taps = FeatureTaps(tiny_mlp(), ["0"])
    with taps.capture():
        with pytest.raises(RuntimeError, match="already attached"):
            taps.attach()


@pytest.mark.parametrize(
    "s_shape, t_shape, conv_type",
    [
        ((2, 3, 8, 8), (2, 5, 4, 4), nn.Conv2d),  # H_s = 2 H_t: 3x3 stride 2
        ((2, 3, 4, 4), (2, 5, 8, 8), nn.ConvTranspose2d),  # 2 H_s = H_t: 4x4 transposed
        ((2, 3, 6, 6), (2, 5, 4, 4), nn.Conv2d),  # H_s >= H_t: (1 + 6 - 4) kernel
        ((2, 3, 4, 4), (2, 5, 4, 4), nn.Conv2d),  # equal: 1x1
    ],
)
def test_convreg_maps_to_the_teacher_shape(s_shape, t_shape, conv_type):
    reg = ConvReg(s_shape, t_shape)
    assert type(reg.conv) is conv_type
    assert reg(torch.randn(s_shape)).shape == t_shape
    assert (reg(torch.randn(s_shape)) >= 0).all()  # BN then ReLU


def test_convreg_kernel_sizes_follow_repdistiller():
    assert ConvReg((1, 3, 8, 8), (1, 5, 4, 4)).conv.kernel_size == (3, 3)
    assert ConvReg((1, 3, 6, 5), (1, 5, 4, 4)).conv.kernel_size == (3, 2)
    assert ConvReg((1, 3, 4, 4), (1, 5, 8, 8)).conv.kernel_size == (4, 4)


def test_convreg_rejects_a_smaller_student_map():
    with pytest.raises(ConfigError, match="larger teacher map"):
        ConvReg((1, 3, 4, 4), (1, 5, 6, 6))


def test_conv1x1_adapter_is_a_channel_matrix():
    adapter = conv1x1_adapter((2, 3, 2, 2), (2, 4, 5, 5))
    x = torch.randn(2, 3, 2, 2)
    w = adapter.weight.detach().numpy()[:, :, 0, 0]
    b = adapter.bias.detach().numpy()
    expected = np.einsum("oc,bchw->bohw", w, x.numpy()) + b[None, :, None, None]
    np.testing.assert_allclose(adapter(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_linear_adapter_flattens_then_maps():
    adapter = linear_adapter((2, 3, 2), (2, 5))
    x = torch.randn(2, 3, 2)
    lin = adapter[1]
    expected = x.reshape(2, 6).numpy() @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
    np.testing.assert_allclose(adapter(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_make_adapter_by_shape_and_by_name():
    assert isinstance(make_adapter((4, 6), (4, 9))[1], nn.Linear)
    assert isinstance(make_adapter((4, 3, 8, 8), (4, 5, 4, 4)), ConvReg)
    assert isinstance(make_adapter((4, 3, 8, 8), (4, 5, 4, 4), kind="conv1x1"), nn.Conv2d)
    assert isinstance(make_adapter((4, 3), (4, 3), kind="identity"), nn.Identity)
    assert set(ADAPTERS.names()) == {"convreg", "conv1x1", "linear", "identity"}
    with pytest.raises(ConfigError, match="no automatic adapter"):
        make_adapter((4, 3, 8, 8), (4, 6))
    with pytest.raises(ConfigError, match="unknown adapter 'conv1x2'.*conv1x1"):
        make_adapter((4, 3, 8, 8), (4, 5, 4, 4), kind="conv1x2")
    with pytest.raises(ConfigError, match="equal shapes"):
        make_adapter((4, 3), (4, 5), kind="identity")


def test_token_sequences_become_square_maps():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # class token + 2x2 grid, D = 3
    fmap = as_feature_map(tokens)
    expected = tokens.numpy()[:, 1:].reshape(2, 2, 2, 3).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(fmap.numpy(), expected)
    np.testing.assert_array_equal(as_feature_map(tokens[:, 1:]).numpy(), expected)  # no class token
    with pytest.raises(ValueError, match="square"):
        as_feature_map(torch.zeros(1, 7, 3))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        as_feature_map(torch.zeros(2, 3))
