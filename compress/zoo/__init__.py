"""Models shipped with the project for demos, tests and benchmarks (no hub downloads at run time).

Use them as MODEL arguments: `compress.zoo:resnet_demo`, `compress.zoo:encoder_tiny`, ...
`compress.zoo:shapes_resnet` is the one with trained weights (see compress/zoo/shapes.py): use it where accuracy
matters; the others carry seeded random weights.
"""

from typing import Any

from compress.zoo.encoder import encoder_demo, encoder_tiny
from compress.zoo.resnet import resnet_demo, resnet_tiny

__all__ = ["encoder_demo", "encoder_tiny", "resnet_demo", "resnet_tiny", "shapes_resnet"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `python -m compress.zoo.shapes` (its data/train CLI) does not find the module
    # already imported by this package and run a second copy of it.
    if name == "shapes_resnet":
        from compress.zoo.shapes import shapes_resnet

        return shapes_resnet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
