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


def float_share(model_path: str) -> float:
    """A --eval score that forces the float fallback at every depth, for `bench/scaling.py --forced`: the share
    of the model's Conv/Gemm layers left in float (1.0 for the fp32 model, ~0 all-INT8). With `--tolerance 0.5`
    the fallback must keep about half of the layers in float, whatever the depth: its whole search (the check
    with every layer in float, the ranking, the float costs, the doubling and the bisection) runs every time,
    which random weights and a fidelity metric do only when a top-1 happens to flip."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger",
                                                      "QLinearConv", "QLinearMatMul")]
    consts = {i.name for i in graph.initializer}
    # a float layer reads its weight straight from an initializer; a quantized one from a DequantizeLinear
    floats = [n for n in layers if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
              and n.input[1] in consts]
    return len(floats) / max(1, len(layers))
