"""CIFAR-style ResNet-18 (3x3 stem, no max-pool), as the FST repository's models/resnet.py."""
import torch.nn.functional as F
from torch import nn

from models.base import Classifier
from models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(Classifier):
    STAGES = (("conv1", "conv1"), ("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"), ("layer4", "layer4"))

    def __init__(self, num_classes=10, in_channels=3, mean=(0.5,), std=(0.5,), width=64):
        w = width
        super().__init__(mean, std, num_classes, 8 * w)
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        cin, stages = w, []
        for mult, stride in [(1, 1), (2, 2), (4, 2), (8, 2)]:
            stages.append(nn.Sequential(BasicBlock(cin, mult * w, stride), BasicBlock(mult * w, mult * w, 1)))
            cin = mult * w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.make_head()

    def body(self, z):
        z = F.relu(self.bn1(self.conv1(z)))
        z = self.layer4(self.layer3(self.layer2(self.layer1(z))))
        return self.pool(z).flatten(1)


@register_model("resnet18", default_width=64)
def resnet18(**kw):
    return ResNet18(**kw)
