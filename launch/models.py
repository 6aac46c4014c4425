"""A small ResNet-style CNN with BatchNorm after every convolution: enough to show what SyncBN changes.

No torchvision dependency; the model is built with plain BatchNorm2d and converted by the worker.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


class SmallResNet(nn.Module):
    """Stem, one BasicBlock per width (stride 2 after the first), global pooling, linear head."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int] | tuple = (16, 32, 64)) -> None:
        super().__init__()
        if not widths:
            raise ValueError("SmallResNet needs at least one width")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks, prev = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(prev, width, stride=1 if i == 0 else 2))
            prev = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, num_classes)
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def compile_model(module: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` (Inductor) as task.compile and the bench's compiled rows use it."""
    # On CPU Inductor runs convolutions channels-last, and torch 2.13's CPU backward of a 1x1 stride-2
    # channels-last convolution corrupts the heap with one thread, what each local worker gets on small
    # machines (the default model has such shortcuts). Contiguous convolutions are unaffected.
    options = {"layout_optimization": False} if device.type == "cpu" else None
    return torch.compile(module, options=options)
