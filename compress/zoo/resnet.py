"""A ResNet-style CNN (ResNet-18 topology: BasicBlocks with residual adds and strided downsampling).

Shipped so demos, tests and benchmarks need no downloads; the width and depth knobs give a tiny variant for
unit tests and the full-size one for measured benchmarks.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem (stride-2 conv, max-pool), stages of BasicBlocks doubling the width, global pool, classifier.
    stem_kernel: 7 as in ResNet-18; 3 for small inputs (the 64x64 shapes model)."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 64, num_classes: int = 1000,
                 stem_kernel: int = 7) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, stem_kernel, 2, stem_kernel // 2, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(image))
        return self.fc(torch.flatten(self.pool(x), 1))


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights with non-trivial BatchNorm statistics, so folding and quantization are exercised."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, generator=gen, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=gen)
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=gen)
            m.running_mean.data = 0.1 * torch.randn(m.running_mean.shape, generator=gen)
            m.running_var.data = 0.5 + torch.rand(m.running_var.shape, generator=gen)
    return model.eval()


def resnet_demo(num_classes: int = 1000) -> ResNet:
    """ResNet-18-sized (11.7 M parameters, 1.8 GMACs at 224x224): the demo and benchmark model."""
    return _init(ResNet((2, 2, 2, 2), 64, num_classes), seed=0)


def resnet_tiny(num_classes: int = 10) -> ResNet:
    """Same topology at width 8: fast enough for unit tests."""
    return _init(ResNet((1, 1, 1, 1), 8, num_classes), seed=0)
