"""The model registry (as timm's): a model file registers itself with a decorated builder function; this module
imports none of them itself, discover() imports every file of models/. Models take [0, 1] pixel tensors, normalise
inside, and expose `features(x)`, `head`, `forward_with_features(x)`, `feature_dim`, `num_classes`, `stages()`
(conventions §2)."""
import importlib
import pkgutil
from pathlib import Path

MODELS: dict = {}   # name -> (builder, default width)


def register_model(name, default_width):
    def add(builder):
        MODELS[name] = (builder, default_width)
        return builder
    return add


def discover():
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in ("registry", "base"):
            importlib.import_module(f"models.{info.name}")
    return MODELS


def build_model(name, num_classes, in_channels, mean, std, width=None):
    """Raises ValueError for an unknown name or a bad width (callers turn it into a message for the user)."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(MODELS)}")
    builder, default_width = MODELS[name]
    width = width or default_width
    if width < 1:
        raise ValueError(f"model width {width} must be a positive integer")
    return builder(num_classes=num_classes, in_channels=in_channels, mean=tuple(mean), std=tuple(std), width=width)
