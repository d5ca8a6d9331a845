"""PreAct-ResNet18, BackdoorBench's default (the WaNet-style one; conventions §2), with adaptive pooling."""
import torch.nn.functional as F
from torch import nn

from models.base import Classifier
from models.registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        # registration order bn1, conv1, bn2, conv2, shortcut; forward order shortcut, conv1, conv2 (FMP cares)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        a = F.relu(self.bn1(x))
        s = self.shortcut(a) if hasattr(self, "shortcut") else x
        r = self.conv1(a)
        r = self.conv2(F.relu(self.bn2(r)))
        return r + s


class PreActResNet18(Classifier):
    STAGES = (("conv1", "conv1"), ("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"), ("layer4", "layer4"))

    def __init__(self, num_classes=10, in_channels=3, mean=(0.5,), std=(0.5,), width=64):
        w = width
        super().__init__(mean, std, num_classes, 8 * w)
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        cin, stages = w, []
        for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)]):
            blocks = [PreActBlock(cin, mult * w, stride), PreActBlock(mult * w, mult * w, 1)]
            cin = mult * w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.make_head()

    def body(self, z):
        z = self.conv1(z)
        z = self.layer4(self.layer3(self.layer2(self.layer1(z))))  # no final BN/ReLU, as the reference
        return self.pool(z).flatten(1)


@register_model("preactresnet18", default_width=64)
def preactresnet18(**kw):
    return PreActResNet18(**kw)
