"""A family of growing depth for bench/scaling.py: the same residual CNN with 2, 4, ..., 64 basic blocks (two
3x3 convolutions each, 32 channels at 32x32), random weights. Only the depth changes, so a stage whose time
grows faster than the layer count shows it."""

from __future__ import annotations

import torch
from torch import nn

DEPTHS = (2, 4, 8, 16, 32, 64)
WIDTH = 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=False), nn.BatchNorm2d(WIDTH)
        self.conv2, self.bn2 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=False), nn.BatchNorm2d(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Deep(nn.Module):
    def __init__(self, blocks: int, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, WIDTH, 3, padding=1, bias=False), nn.BatchNorm2d(WIDTH), nn.ReLU())
        self.blocks = nn.Sequential(*[Block() for _ in range(blocks)])
        self.head = nn.Linear(WIDTH, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _factory(blocks: int):
    def build() -> nn.Module:
        torch.manual_seed(blocks)
        return Deep(blocks).eval()

    return build


for _n in DEPTHS:
    globals()[f"blocks_{_n}"] = _factory(_n)
