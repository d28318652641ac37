"""Feature taps and adapters: how KD methods read a model's intermediate outputs and map them to a teacher's shape.

* :class:`FeatureTaps` registers forward hooks on named sub-modules (names as in ``model.named_modules()``), so a
  model is distilled without being edited (torchdistill's forward-hook design).
* Adapters map a student feature to a teacher feature's shape: :class:`ConvReg` (RepDistiller's FitNet regressor),
  :func:`conv1x1_adapter`, :func:`linear_adapter`, and :func:`make_adapter`, which picks one by name or by shape.
* :func:`as_feature_map` turns a ViT-style token sequence ``[B, N, D]`` into a channels-first map ``[B, D, h, w]``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

from torch import Tensor, nn

from hpmkd.registry import ConfigError, Registry, did_you_mean

Shape = Sequence[int]


def first_tensor(output: Any, name: str) -> Tensor:
    """The tensor a hooked module produced: the output itself, or the first element of a tuple/list output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"feature tap {name!r}: the module returned {type(output).__name__}, not a tensor (or a tuple starting with "
        f"one). Tap a sub-module that returns a tensor."
    )


class FeatureTaps:
    """Capture the outputs of named sub-modules during a forward pass.

    ``names`` are module names from ``model.named_modules()`` (``""`` is the model itself). Hooks exist only while
    capturing, so the model is left exactly as it was::

        taps = FeatureTaps(model, ["layer2", "avgpool"])
        with taps.capture() as feats:      # or: with FeatureTaps(model, names) as feats:
            logits = model(x)
        feats["layer2"]                    # the tensor layer2 returned (graph kept)

    A module called several times in one forward pass keeps its last output. Each capture starts a fresh dict, so a
    dict from an earlier capture is never overwritten.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.names = tuple(dict.fromkeys(names))
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            available = [n for n in modules if n]
            hints = "".join(did_you_mean(n, available) for n in missing)
            raise ConfigError(
                f"{type(model).__name__} has no module named {', '.join(repr(n) for n in missing)}.{hints} "
                f"Available module names: {', '.join(available)}."
            )
        self._modules = {n: modules[n] for n in self.names}
        self._handles: list[Any] = []
        self.outputs: dict[str, Tensor] = {}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.outputs[name] = first_tensor(output, name)

        return hook

    def attach(self) -> dict[str, Tensor]:
        """Register the hooks; returns the (new, empty) dict the next forward pass fills."""
        if self._handles:
            raise RuntimeError("FeatureTaps is already attached; detach() it (or leave its `with` block) first.")
        self.outputs = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._modules.items()]
        return self.outputs

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def capture(self) -> Iterator[dict[str, Tensor]]:
        outputs = self.attach()
        try:
            yield outputs
        finally:
            self.detach()

    def __enter__(self) -> dict[str, Tensor]:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def as_feature_map(feature: Tensor) -> Tensor:
    """A channels-first map ``[B, C, H, W]`` from a tapped feature.

    4-D tensors are taken as ``[B, C, H, W]`` already. 3-D tensors are ViT-style token sequences ``[B, N, D]``:
    ``N = h·h`` tokens become a ``[B, D, h, h]`` map; with ``N = 1 + h·h`` the leading class token is dropped first.
    Channels-last maps (torchvision Swin stages) must be tapped after their permute, or the model must expose them.
    """
    if feature.dim() == 4:
        return feature
    if feature.dim() == 3:
        b, n, d = feature.shape
        for skip in (0, 1):
            side = math.isqrt(n - skip)
            if side * side == n - skip and side > 0:
                return feature[:, skip:].transpose(1, 2).reshape(b, d, side, side)
        raise ValueError(
            f"a token feature of shape {tuple(feature.shape)} has {n} tokens: neither N nor N-1 is a square, so it "
            f"cannot be laid out as a square map. Tap a layer with a square token grid or a [B, C, H, W] map."
        )
    raise ValueError(
        f"a feature map must be [B, C, H, W] or tokens [B, N, D]; got shape {tuple(feature.shape)}. "
        f"Tap a convolutional stage or a transformer block instead."
    )


def check_shapes(student_shape: Shape, teacher_shape: Shape, ndim: int, kind: str) -> None:
    if len(student_shape) != ndim or len(teacher_shape) != ndim:
        raise ConfigError(
            f"adapter {kind!r} needs {ndim}-D shapes (batch first); got student {tuple(student_shape)}, "
            f"teacher {tuple(teacher_shape)}."
        )


class ConvReg(nn.Module):
    """FitNet's convolutional regressor ``r`` (RepDistiller ``models/util.py::ConvReg``), then BN (+ ReLU).

    From student ``[B, C_s, H_s, W_s]`` to teacher ``[B, C_t, H_t, W_t]``:
    ``H_s = 2·H_t``: 3×3 conv, stride 2, padding 1; ``2·H_s = H_t``: 4×4 transposed conv, stride 2, padding 1;
    ``H_s ≥ H_t``: a ``(1 + H_s − H_t) × (1 + W_s − W_t)`` conv (a 1×1 conv when the sizes match).
    A student map smaller than the teacher's (other than by exactly 2×) is an error, as in RepDistiller.
    """

    def __init__(self, student_shape: Shape, teacher_shape: Shape, use_relu: bool = True):
        super().__init__()
        check_shapes(student_shape, teacher_shape, 4, "convreg")
        _, s_c, s_h, s_w = student_shape
        _, t_c, t_h, t_w = teacher_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ConfigError(
                f"ConvReg cannot map a student map of {s_h}x{s_w} to a larger teacher map of {t_h}x{t_w} (only exactly "
                f"2x larger is supported). Choose a deeper teacher layer or a shallower student layer."
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU() if use_relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def conv1x1_adapter(student_shape: Shape, teacher_shape: Shape) -> nn.Module:
    """``φ(F) = W ∗ F + b``: a 1×1 convolution from the student's to the teacher's channels (spatial size kept);
    the ``φ_l`` of the HumP-KD reconstruction (our reconstruction of HumP-KD, arXiv 2606.14684, abstract only)."""
    check_shapes(student_shape, teacher_shape, 4, "conv1x1")
    return nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1)


def linear_adapter(student_shape: Shape, teacher_shape: Shape) -> nn.Module:
    """``φ(f) = W · flatten(f) + b`` from the student's to the teacher's flattened feature size (CRD's ``Embed``)."""
    if len(student_shape) < 2 or len(teacher_shape) < 2:
        raise ConfigError(f"adapter 'linear' needs batched shapes; got {tuple(student_shape)}, {tuple(teacher_shape)}.")
    return nn.Sequential(nn.Flatten(1), nn.Linear(math.prod(student_shape[1:]), math.prod(teacher_shape[1:])))


def identity_adapter(student_shape: Shape, teacher_shape: Shape) -> nn.Module:
    """``φ(F) = F``: only for features whose shapes already match."""
    if tuple(student_shape[1:]) != tuple(teacher_shape[1:]):
        raise ConfigError(
            f"adapter 'identity' needs equal shapes; got student {tuple(student_shape)}, "
            f"teacher {tuple(teacher_shape)}."
        )
    return nn.Identity()


ADAPTERS: Registry[nn.Module] = Registry("adapter")
ADAPTERS.register("convreg")(ConvReg)
ADAPTERS.register("conv1x1")(conv1x1_adapter)
ADAPTERS.register("linear")(linear_adapter)
ADAPTERS.register("identity")(identity_adapter)

#: ``kind="auto"`` by the number of dimensions: vectors get a linear map, maps get FitNet's ConvReg.
AUTO_ADAPTER = {2: "linear", 4: "convreg"}


def make_adapter(student_shape: Shape, teacher_shape: Shape, kind: str = "auto") -> nn.Module:
    """An adapter from ``student_shape`` to ``teacher_shape`` (both batch-first): ``kind`` is one of
    ``auto``, ``convreg``, ``conv1x1``, ``linear``, ``identity``."""
    if kind == "auto":
        if len(student_shape) != len(teacher_shape) or len(student_shape) not in AUTO_ADAPTER:
            raise ConfigError(
                f"no automatic adapter from a student feature {tuple(student_shape)} to a teacher feature "
                f"{tuple(teacher_shape)}: both must be [B, D] or [B, C, H, W]. "
                f"Name a kind: {', '.join(ADAPTERS.names())}."
            )
        kind = AUTO_ADAPTER[len(student_shape)]
    return ADAPTERS.get(kind, "adapter")(student_shape, teacher_shape)
