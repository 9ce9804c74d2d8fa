"""Built-in architectures, addressed like any user factory: `--arch edgec.models.zoo:NAME[?k=v]`."""
from __future__ import annotations

from torch import nn

DEMO_ARCH = "torchvision:resnet18?num_classes=10"   # the design card's scenario, on 3x32x32 digits
DEMO_INPUT_SHAPE = (1, 3, 32, 32)


def digits_cnn(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> nn.Module:
    """A small residual-free CNN that trains on the digits in seconds: the test suite's subject."""
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
    return nn.Sequential(
        block(in_channels, width), block(width, width), nn.MaxPool2d(2),
        block(width, 2 * width), block(2 * width, 2 * width), nn.MaxPool2d(2),
        block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))
