"""The static "same" padding of the lukemelas EfficientNet-PyTorch port, for timm's ``tf_efficientnet_b*``.

TF's "same" padding depends on the input size: a stride-2 convolution with kernel k pads k − 2 pixels
on an even input and k − 1 on an odd one, the extra pixel at the bottom/right. timm computes it for
the actual input at every call. The lukemelas port (which the official OneNIP and CRAD code vendor)
computes it once, for the variant's native resolution (380 px for b4), and pads every input that way.
At 224, 256 or 320 px the two agree everywhere but in b4's stage-3 downsampling (``blocks.2.0.conv_dw``,
5×5): its input is odd at 380 px (95) and even at these sizes, so the port pads (2, 2) where timm pads
(1, 2), and every later feature sits on a grid shifted by one pixel (OneNIP spec §1, the CRAD
comparison in issue 19). ``use_lukemelas_padding`` makes a timm network pad as the port does.

Written here because neither timm nor lukemelas' package offers it: timm's static padding is
symmetric, and the port's padding comes with the port's own (differently named) modules.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

# EfficientNet-PyTorch's ``efficientnet_params``: the resolution each variant's padding is computed for.
LUKEMELAS_NATIVE_SIZE = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600,
                         "b8": 672}
PADDING_MODES = ("dynamic", "lukemelas")
_VARIANT = re.compile(r"^tf_efficientnet_(b[0-8])(\.|$)")


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) TF "same" padding of one axis of ``size`` pixels: the output has ceil(size / stride)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class StaticPaddedConv2d(nn.Conv2d):
    """A convolution with a fixed (left, right, top, bottom) zero padding; its parameters keep their names."""

    def __init__(self, conv: nn.Conv2d, padding: tuple[int, int, int, int]) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight, self.bias = conv.weight, conv.bias
        self.static_padding = tuple(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.static_padding), self.weight, self.bias, self.stride, 0, self.dilation,
                        self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, static_padding={self.static_padding}"


def native_size(model_name: str) -> int:
    """The resolution the lukemelas port computes its padding for; an error for a model it does not have."""
    match = _VARIANT.match(model_name)
    if match is None:
        raise ValueError(f"backbone_padding='lukemelas' is the padding of the lukemelas EfficientNet-PyTorch port, "
                         f"which exists for tf_efficientnet_b0 … b8 only, not {model_name!r}; use 'dynamic'.")
    return LUKEMELAS_NATIVE_SIZE[match.group(1)]


def use_lukemelas_padding(model: nn.Module, model_name: str) -> int:
    """Give every dynamically padded convolution of ``model`` (timm's ``Conv2dSame``) the padding the port computes
    for its native size: the input size each one sees at that resolution is recorded by running the network once
    on a zero image. Returns how many convolutions were replaced."""
    from timm.layers import Conv2dSame

    size = native_size(model_name)
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            seen.setdefault(name, tuple(inputs[0].shape[-2:]))
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, Conv2dSame)]
    was_training = model.training
    try:
        with torch.no_grad():
            parameter = next(model.parameters())
            model.eval()(torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    for name, (height, width) in seen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, child)
        top, bottom = same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        left, right = same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        setattr(parent, child, StaticPaddedConv2d(conv, (left, right, top, bottom)))
    return len(seen)


__all__ = ["LUKEMELAS_NATIVE_SIZE", "PADDING_MODES", "StaticPaddedConv2d", "native_size", "same_padding",
           "use_lukemelas_padding"]
