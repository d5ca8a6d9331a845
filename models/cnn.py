"""A compact CNN for 28x28 grey-scale data: the CPU default, a backdoored Fashion-MNIST model in under 2 minutes
on 2 cores. Four conv-BN-ReLU layers (w, 2w, 4w, 4w channels; max-pool after the first two), then average pooling
to 2x2, so the feature vector keeps a coarse layout of the image (d = 16w; 128 at the default w = 8): on this data
it learns faster than a global 1x1 pooling, at the same cost."""
from torch import nn

from models.base import Classifier
from models.registry import register_model

POOL = 2


def conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CompactCNN(Classifier):
    STAGES = (("layer1", "layers.0"), ("layer2", "layers.2"), ("layer3", "layers.4"), ("layer4", "layers.5"))

    def __init__(self, num_classes=10, in_channels=1, mean=(0.5,), std=(0.5,), width=8):
        w = width
        super().__init__(mean, std, num_classes, 4 * w * POOL * POOL)
        self.layers = nn.Sequential(
            conv_bn(in_channels, w), nn.MaxPool2d(2),          # 28 -> 14
            conv_bn(w, 2 * w), nn.MaxPool2d(2),                 # 14 -> 7
            conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(POOL), nn.Flatten())
        self.make_head()

    def body(self, z):
        return self.layers(z)


@register_model("cnn", default_width=8)
def cnn(**kw):
    return CompactCNN(**kw)
