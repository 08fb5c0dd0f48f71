"""Models shipped with the project for demos, tests and benchmarks (no hub downloads at run time).

Use them as MODEL arguments: `compress.zoo:resnet_demo`, `compress.zoo:encoder_tiny`, ...
"""

from compress.zoo.encoder import encoder_demo, encoder_tiny
from compress.zoo.resnet import resnet_demo, resnet_tiny

__all__ = ["encoder_demo", "encoder_tiny", "resnet_demo", "resnet_tiny"]
