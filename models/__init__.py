"""Model registry: every model takes [0, 1] pixel tensors, normalises inside, and exposes
`features(x)`, `head`, `forward_with_features(x)`, `feature_dim`, `num_classes` (conventions §2)."""
from models.cnn import CompactCNN
from models.preact_resnet import PreActResNet18
from models.resnet import ResNet18
from models.vgg import VGG19BN

MODELS = {
    "cnn": (CompactCNN, 8),              # (class, default width)
    "preactresnet18": (PreActResNet18, 64),
    "resnet18": (ResNet18, 64),
    "vgg19_bn": (VGG19BN, 64),
}


def build_model(name, num_classes, in_channels, mean, std, width=None):
    from utils.errors import UserError
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; known models: {', '.join(MODELS)}")
    cls, default_width = MODELS[name]
    width = width or default_width
    if width < 1:
        raise UserError(f"model width {width} must be a positive integer")
    return cls(num_classes=num_classes, in_channels=in_channels, mean=tuple(mean), std=tuple(std), width=width)
