"""CIFAR-style VGG19-BN: 16 conv-BN-ReLU layers, five max-pools (ceil mode, so 28x28 inputs work), one head."""
from torch import nn

from models.base import Classifier
from models.registry import register_model

CFG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG19BN(Classifier):
    def __init__(self, num_classes=10, in_channels=3, mean=(0.5,), std=(0.5,), width=64):
        scale = width / 64
        layers, cin = [], in_channels
        for v in CFG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                cout = max(1, int(v * scale))
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        super().__init__(mean, std, num_classes, cin)
        self.layers = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        pools = [i for i, m in enumerate(self.layers) if isinstance(m, nn.MaxPool2d)]
        self.STAGES = tuple((f"layer{j + 1}", f"layers.{i}") for j, i in enumerate(pools))   # each block ends at its pool
        self.make_head()

    def body(self, z):
        return self.layers(z)


@register_model("vgg19_bn", default_width=64)
def vgg19_bn(**kw):
    return VGG19BN(**kw)
