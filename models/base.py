"""The uniform model interface (conventions §2): pixel-space input, normalisation inside, features + one head."""
import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers (saved with the weights, never trained).
    Nothing here clamps: PDB's trigger value 2.0 must reach the network intact."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Subclasses build their layers and define `body(z)`: normalised images -> pooled, flattened features."""

    def __init__(self, mean, std, num_classes, feature_dim):
        super().__init__()
        self.normalize = Normalize(mean, std)  # registered first: the first module
        self.num_classes = num_classes
        self.feature_dim = feature_dim

    def make_head(self):
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def body(self, z):
        raise NotImplementedError

    def features(self, x):
        return self.body(self.normalize(x))

    def forward(self, x):
        return self.head(self.features(x))

    def forward_with_features(self, x):
        f = self.features(x)
        return self.head(f), f

    STAGES = ()   # (stage name, dotted module path), in forward order

    def stages(self) -> dict:
        """The main stages by name, in forward order (BackdoorBench's names for the ResNets)."""
        modules = dict(self.named_modules())
        return {name: modules[path] for name, path in self.STAGES}

    def head_parameters(self):
        return list(self.head.parameters())

    def backbone_parameters(self):
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if id(p) not in head]
