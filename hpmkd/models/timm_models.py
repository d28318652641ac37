"""Any timm model by name (Wightman, "PyTorch Image Models", https://github.com/huggingface/pytorch-image-models),
wrapped so that it fits hpmkd's inputs and feature taps.

:class:`TimmNet` holds the timm model as ``net``, built with ``timm.create_model(name, num_classes=..,
in_chans=.., **options)``: every keyword option of the timm architecture is a model option (``img_size``,
``patch_size``, ``embed_dim``, ``depth`` / ``depths``, ``num_heads``, ``window_size``, ``width_factor`` ...), so a
CPU-sized Swin, ViT or MobileViT is the same name with smaller options. Models that accept one input size only
(timm's ``fixed_input_size``: ViT, Swin) are built for the data's ``H × W`` unless ``img_size`` is given.

Weights: ``pretrained: true`` loads timm's pretrained weights (downloaded from the hub where the internet is
reachable); ``checkpoint: PATH`` loads a local weights file instead (``.safetensors``, or a torch file read with
``weights_only=True``). Either way timm adapts the input convolution to ``in_channels``, resamples position
embeddings to ``img_size`` and gives a fresh classifier when ``num_classes`` differs. Nothing is loaded while a model
is built on the meta device (shapes only).

Feature taps are ``[B, C, H, W]`` maps whatever the architecture lays them out as (:class:`StageMap`): the modules of
``net.feature_info`` (Swin stages, MobileViT stages; four evenly spaced ViT blocks, as for torchvision ViTs) each
feed an identity module ``maps.<i>`` with their output turned into a channels-first map: a channels-last Swin stage
``[B, H, W, C]`` is permuted, ViT tokens ``[B, P + h·w, D]`` lose their ``P`` prefix tokens (class and register
tokens) and are laid out on the patch grid ``h × w``. The embedding tap is ``embedding``, fed the classifier's input
(as :class:`hpmkd.models.tv.TorchvisionNet` does); the classifier is ``net.<the model's get_classifier()>``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.models.base import check_positive
from hpmkd.models.tv import FeedThrough

#: timm names taken by one of ours or by torchvision are reached with this prefix (``timm.resnet18``)
TIMM_PREFIX = "timm."
#: a transformer with one feature entry per block taps this many evenly spaced blocks (as torchvision ViTs)
TOKEN_TAPS = 4


def timm_names() -> list[str]:
    """timm's model names (architectures with their variants: ``vit_base_patch16_224``, ``mobilevit_s`` ...)."""
    import timm  # about two seconds: only when a timm model is listed or built

    return timm.list_models()


class StageMap:
    """A forward hook that passes a module's output, as a ``[B, C, H, W]`` map, through ``target`` (an identity
    module, the feature tap). A callable object rather than a closure, so that copies and pickles keep pointing at
    the copied ``target``.

    ``layout``: ``"NCHW"`` (as is), ``"NHWC"`` (permuted) or ``"tokens"`` (the first ``prefix`` tokens dropped, the
    rest laid out on ``grid``, or on the square grid their number makes when it is not ``grid``'s)."""

    def __init__(self, target: nn.Module, layout: str, prefix: int = 0, grid: tuple[int, int] | None = None):
        self.target = target
        self.layout = layout
        self.prefix = prefix
        self.grid = grid

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.target(to_map(output[0] if isinstance(output, (tuple, list)) else output, self.layout, self.prefix,
                           self.grid))


def to_map(feature: Tensor, layout: str, prefix: int = 0, grid: tuple[int, int] | None = None) -> Tensor:
    """``feature`` as ``[B, C, H, W]`` (see :class:`StageMap`)."""
    if layout == "NHWC":
        return feature.permute(0, 3, 1, 2)
    if layout == "tokens":
        tokens = feature[:, prefix:]
        b, n, d = tokens.shape
        h, w = grid if grid is not None and grid[0] * grid[1] == n else (math.isqrt(n), n // max(1, math.isqrt(n)))
        if h * w != n:
            raise ValueError(f"{n} patch tokens do not fill a {h}x{w} grid; tap a block with a rectangular grid.")
        return tokens.transpose(1, 2).reshape(b, d, h, w)
    return feature


def tap_entries(feature_info: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The feature-info entries tapped: all of them, or, when every entry has the same reduction (a plain
    transformer lists each block), :data:`TOKEN_TAPS` evenly spaced ones (blocks L/4, L/2, 3L/4, L)."""
    if len(feature_info) > TOKEN_TAPS and len({e["reduction"] for e in feature_info}) == 1:
        picks = sorted({max(1, round(len(feature_info) * q / TOKEN_TAPS)) - 1 for q in range(1, TOKEN_TAPS + 1)})
        return [feature_info[i] for i in picks]
    return list(feature_info)


def tap_layout(net: nn.Module, module: nn.Module) -> str:
    """How ``module`` lays its output out: tokens for a transformer block of a token model, channels-last for a
    model whose ``output_fmt`` says so (Swin), channels-first otherwise."""
    if getattr(net, "num_prefix_tokens", None) is not None and hasattr(net, "blocks") and module in set(net.blocks):
        return "tokens"
    return "NHWC" if str(getattr(net, "output_fmt", "NCHW")) == "NHWC" else "NCHW"


def fixed_input_size(name: str) -> bool:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


def build_timm(name: str, num_classes: int, in_channels: int, pretrained: bool, checkpoint: str | None,
               **options: Any) -> nn.Module:
    """``timm.create_model`` with the weights asked for (none on the meta device)."""
    import timm

    if checkpoint is not None and pretrained:
        raise ValueError("give either pretrained: true (timm's weights, downloaded) or checkpoint: PATH (a local "
                         "file), not both.")
    shapes_only = torch.get_default_device().type == "meta"
    load: dict[str, Any] = {}
    if checkpoint is not None and not shapes_only:
        load = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(checkpoint)}}
    elif pretrained and not shapes_only:
        load = {"pretrained": True}
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_channels, **load, **options)
    except (OSError, RuntimeError) as err:  # no file, no network, or weights that do not fit
        source = f"checkpoint {checkpoint!r}" if checkpoint is not None else "timm's pretrained weights (a download)"
        raise ValueError(f"could not load {source} for {name!r}: {err}. Offline, download the weights file once and "
                         f"give it as checkpoint: PATH.") from err


class TimmNet(nn.Module):
    """``net`` (the timm model) with channels-first stage taps ``maps.<i>`` and the ``embedding`` tap; see the
    module docstring."""

    def __init__(self, name: str, num_classes: int, in_channels: int, input_shape: tuple[int, ...] | None = None,
                 pretrained: bool = False, checkpoint: str | None = None, **options: Any):
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        if input_shape is not None and "img_size" not in options and fixed_input_size(name):
            options["img_size"] = tuple(int(d) for d in input_shape[1:])
        net = build_timm(name, num_classes, in_channels, pretrained, checkpoint, **options)
        self.net = net
        modules = {m: n for n, m in net.named_modules()}
        head = modules[net.get_classifier()]
        self.embedding = nn.Identity()
        net.get_submodule(head).register_forward_pre_hook(FeedThrough(self.embedding))
        entries = tap_entries(list(getattr(net, "feature_info", [])))
        self.maps = nn.ModuleList(nn.Identity() for _ in entries)
        grid = getattr(getattr(net, "patch_embed", None), "grid_size", None)
        for target, entry in zip(self.maps, entries):
            module = net.get_submodule(entry["module"])
            hook = StageMap(target, tap_layout(net, module), int(getattr(net, "num_prefix_tokens", 0) or 0),
                            tuple(grid) if grid is not None else None)
            module.register_forward_hook(hook)
        self.taps = ModelTaps(feature_taps=tuple(f"maps.{i}" for i in range(len(entries))),
                              embedding_tap="embedding", classifier_tap=f"net.{head}")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
