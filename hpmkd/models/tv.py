"""Any torchvision classification model by name, wrapped so that it fits hpmkd's inputs and feature taps.

:class:`TorchvisionNet` holds the torchvision model as ``net`` (built with ``weights=None`` and ``num_classes``, or
with ImageNet weights and a fresh head when ``pretrained=True``) and adds, only where needed:

Weights: ``pretrained=True`` loads torchvision's ImageNet weights (a download); ``checkpoint=PATH`` loads a local
weights file instead (``.safetensors``, or a torch state dict read with ``weights_only=True``), its classifier left
out where its shape does not fit ``num_classes`` (:func:`load_initial_weights`). Nothing is loaded while a model is
built on the meta device (shapes only).

* ``adapter``: a learned 1×1 conv from ``in_channels`` to the 3 channels torchvision models expect (an identity for
  3-channel inputs);
* ``resize``: bilinear upsampling inside the model (:class:`InputResize`). ViTs and MaxViT only accept one image size,
  so every input is resized to it (224, or the size the pretrained weights were made for). A few CNNs fail on small
  inputs (AlexNet < 63 px, Inception-v3 < 75, ConvNeXt / DenseNet / VGG < 32: measured with torchvision 0.29 on
  28×28 and 32×32 inputs), so smaller inputs are upsampled to that minimum (aspect ratio not kept).

GoogLeNet and Inception-v3 are built with ``aux_logits=False`` (our choice: a training forward then returns logits,
not a tuple); pass ``aux_logits=True`` to override.

Feature taps (names start with ``net.``): the classifier is the last ``nn.Linear`` (SqueezeNet: its last conv); the
embedding is ``embedding``, an identity module that the classifier's input is passed through (a forward pre-hook),
so it is exactly the classifier's input (``[B, D]``; SqueezeNet: a ``[B, 512, h, w]`` map). Stage maps: ViTs tap four
evenly spaced encoder blocks (tokens ``[B, 1 + h·w, D]``); Swin taps ``net.permute`` (its stages are channels-last,
only the final permute gives ``[B, C, H, W]``); every other family is probed once at build time
(:func:`probe_events`, :func:`stage_taps_from_events`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpmkd.distill_batch import ModelTaps
from hpmkd.models.base import check_positive

#: ``(name prefix, size)``: inputs are resized to exactly ``size`` (``None``: the model's ``image_size``).
FIXED_INPUT: tuple[tuple[str, int | None], ...] = (("vit_", None), ("maxvit", 224))
#: ``(name prefix, size)``: inputs smaller than ``size`` are upsampled to it.
MIN_INPUT: tuple[tuple[str, int], ...] = (
    ("alexnet", 63),
    ("inception_v3", 75),
    ("convnext", 32),
    ("densenet", 32),
    ("vgg", 32),
)
#: Keyword arguments torchvision builders get unless the user sets them.
BUILD_DEFAULTS: dict[str, dict[str, Any]] = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}
#: Layers that only pass their input on (in eval mode): never stage taps.
PASS_THROUGH = (nn.Dropout, nn.Identity)
#: Side of the zero image used to probe stage maps (large enough that no stage of a stride-32 net is 1×1).
PROBE_SIZE = 64


def torchvision_names() -> list[str]:
    """torchvision's classification model names."""
    import torchvision  # about a second to import: only when a torchvision model is listed or built

    return sorted(torchvision.models.list_models(module=torchvision.models))


class InputResize(nn.Module):
    """Bilinear resize of ``[B, C, H, W]`` inputs: to exactly ``size × size`` (``exact``), or each side up to at
    least ``size`` (otherwise). Inputs that already fit pass through unchanged."""

    def __init__(self, size: int, exact: bool):
        super().__init__()
        self.size = size
        self.exact = exact

    def target(self, height: int, width: int) -> tuple[int, int]:
        if self.exact:
            return self.size, self.size
        return max(height, self.size), max(width, self.size)

    def forward(self, x: Tensor) -> Tensor:
        size = self.target(x.shape[-2], x.shape[-1])
        if size == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, exact={self.exact}"


class FeedThrough:
    """A forward pre-hook that passes a module's first input through ``module`` (so hooks on it see that input).

    A callable object rather than a closure, so that ``copy.deepcopy`` and pickling keep it pointing at the copied
    ``module``."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, target: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.module(args[0]), *args[1:])


def classifier_name(net: nn.Module) -> str:
    """The last ``nn.Linear`` in registration order (SqueezeNet, which has none: its last ``nn.Conv2d``)."""
    for kind in (nn.Linear, nn.Conv2d):
        names = [n for n, m in net.named_modules() if isinstance(m, kind)]
        if names:
            return names[-1]
    raise ValueError(f"{type(net).__name__} has no linear or conv layer to use as its classifier.")


def replace_module(net: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, new)


def fresh_head(old: nn.Module, num_classes: int) -> nn.Module:
    """A new, randomly initialised classifier like ``old`` with ``num_classes`` outputs."""
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if isinstance(old, nn.Conv2d):
        return nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)
    raise TypeError(f"cannot replace a {type(old).__name__} classifier.")


def vit_stage_taps(net: nn.Module) -> tuple[str, ...]:
    """Four evenly spaced encoder blocks of a torchvision ViT (blocks L/4, L/2, 3L/4, L; 1-based)."""
    blocks = [n for n, _ in net.encoder.layers.named_children()]
    picks = sorted({max(1, round(len(blocks) * q / 4)) - 1 for q in (1, 2, 3, 4)})
    return tuple(f"encoder.layers.{blocks[i]}" for i in picks)


def swin_stage_taps(net: nn.Module) -> tuple[str, ...]:
    """Swin's stages are channels-last ``[B, H, W, C]``; only ``permute`` gives a ``[B, C, H, W]`` map."""
    return ("permute",)


STAGE_TAP_RULES: tuple[tuple[str, Callable[[nn.Module], tuple[str, ...]]], ...] = (
    ("vit_", vit_stage_taps),
    ("swin", swin_stage_taps),
)


#: One probe event: ``("start" | "end" | "stop", module name, output resolution of an "end" with a 4-D output)``.
Event = tuple[str, str, "tuple[int, int] | None"]


def probe_events(net: nn.Module, classifier: str, in_size: int) -> list[Event]:
    """Run ``net`` once on a zero ``in_size``² image (eval mode, no grad) and record when each module at most two
    levels deep (``layer1``, ``features.3``; not dropout or identity layers) starts and ends, with the resolution of
    its output when that is 4-D; a ``"stop"`` event marks the classifier starting."""
    events: list[Event] = []
    handles = [net.get_submodule(classifier).register_forward_pre_hook(lambda m, a: events.append(("stop", "", None)))]
    for name, module in net.named_modules():
        if not name or name.count(".") > 1 or isinstance(module, PASS_THROUGH):
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: events.append(("start", n, None))))
        handles.append(
            module.register_forward_hook(
                lambda m, a, out, n=name: events.append(
                    ("end", n, tuple(out.shape[-2:]) if isinstance(out, Tensor) and out.dim() == 4 else None)
                )
            )
        )
    was_training = net.training
    param = next(net.parameters())
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 3, in_size, in_size, device=param.device, dtype=param.dtype))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return events


def stage_taps_from_events(events: list[Event]) -> tuple[str, ...]:
    """The stage maps in a probe's events.

    Candidates finish before the classifier starts, have a 4-D output and do not span several resolutions (no
    candidate finishing inside them has another output size). Resolutions are visited in the order they appear,
    skipping 1×1 (pooled) outputs and anything larger than the smallest seen so far (AlexNet's and VGG's adaptive
    pooling back up to 6×6 / 7×7). At each resolution the tap is the last candidate to finish among the least
    deeply nested ones (Inception's ``Mixed_6e``, not a branch of the next, downsampling ``Mixed_7a``).
    """
    spans = (-1, -1)  # marks a module that spans several resolutions: never a tap, but it spans its parents too
    finished: list[tuple[str, tuple[int, int]]] = []  # (name, output resolution) in finishing order
    opened: dict[str, int] = {}
    for kind, name, res in events:
        if kind == "stop":
            break
        if kind == "start":
            opened[name] = len(finished)
            continue
        inner = {r for _, r in finished[opened.pop(name):]}
        if res is not None and inner <= {res}:
            finished.append((name, res))
        elif inner:
            finished.append((name, spans))
    best: dict[tuple[int, int], tuple[int, str]] = {}  # resolution -> (nesting level, name), in order of appearance
    smallest = None
    for name, res in finished:
        if res in (spans, (1, 1)) or (smallest is not None and res[0] * res[1] > smallest):
            continue
        smallest = res[0] * res[1]
        level = name.count(".")
        if res not in best or level <= best[res][0]:
            best[res] = (level, name)
    return tuple(name for _, name in best.values())


def read_weights(path: str) -> dict[str, Tensor]:
    """A weights file as a state dict: ``.safetensors``, or a torch file read with ``weights_only=True`` (a
    ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def load_initial_weights(net: nn.Module, path: str, head: str) -> None:
    """Load the weights file ``path`` into ``net``; the classifier ``head``'s entries are skipped where their shapes
    differ (another number of classes: the head stays freshly initialised). Any other missing, extra or misshapen
    entry is an error naming it."""
    try:
        state = read_weights(path)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"checkpoint {path!r} could not be read as weights: {err}") from err
    own = net.state_dict()
    state = {k: v for k, v in state.items()
             if not (k.startswith(f"{head}.") and k in own and tuple(v.shape) != tuple(own[k].shape))}
    missing = [k for k in own if k not in state and not k.startswith(f"{head}.")]
    extra = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise ValueError(f"checkpoint {path!r} does not fit {type(net).__name__}: entry {first!r} is "
                         f"{'missing' if missing else 'not in the model' if extra else 'of another shape'}.")
    net.load_state_dict(state, strict=False)


class TorchvisionNet(nn.Module):
    """``adapter`` → ``resize`` → ``net`` (the first two identities where not needed); see the module docstring."""

    def __init__(self, name: str, num_classes: int, in_channels: int, pretrained: bool = False,
                 checkpoint: str | None = None, **kwargs: Any):
        super().__init__()
        check_positive(num_classes=num_classes, in_channels=in_channels)
        import torchvision

        if pretrained and checkpoint is not None:
            raise ValueError("give either pretrained: true (ImageNet weights, downloaded) or checkpoint: PATH (a local "
                             "file), not both.")
        kwargs = {**BUILD_DEFAULTS.get(name, {}), **kwargs}
        shapes_only = torch.get_default_device().type == "meta"
        if pretrained and not shapes_only:  # ImageNet weights come with a 1000-class head: replaced unless asked for
            net = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
        else:
            net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        if checkpoint is not None and not shapes_only:
            load_initial_weights(net, checkpoint, classifier_name(net))
        head = classifier_name(net)
        old = net.get_submodule(head)
        if (old.out_features if isinstance(old, nn.Linear) else old.out_channels) != num_classes:
            replace_module(net, head, fresh_head(old, num_classes))
        self.adapter = nn.Conv2d(in_channels, 3, kernel_size=1) if in_channels != 3 else nn.Identity()
        resize = self.input_resize(name, net)
        self.resize = resize if resize is not None else nn.Identity()
        self.net = net
        self.embedding = nn.Identity()
        net.get_submodule(head).register_forward_pre_hook(FeedThrough(self.embedding))
        rule = next((r for prefix, r in STAGE_TAP_RULES if name.startswith(prefix)), None)
        if rule is not None:
            stages = rule(net)
        else:
            probe = PROBE_SIZE if resize is None else resize.target(PROBE_SIZE, PROBE_SIZE)[0]
            stages = stage_taps_from_events(probe_events(net, head, probe))
        self.taps = ModelTaps(
            feature_taps=tuple(f"net.{s}" for s in stages), embedding_tap="embedding", classifier_tap=f"net.{head}"
        )

    @staticmethod
    def input_resize(name: str, net: nn.Module) -> InputResize | None:
        for prefix, size in FIXED_INPUT:
            if name.startswith(prefix):
                return InputResize(size if size is not None else int(net.image_size), exact=True)
        for prefix, size in MIN_INPUT:
            if name.startswith(prefix):
                return InputResize(size, exact=False)
        return None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.resize(self.adapter(x)))
