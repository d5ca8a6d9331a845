"""Models: one file per architecture family, each registering itself (models/registry.py)."""
from models.registry import MODELS, build_model, discover, register_model

discover()

__all__ = ["MODELS", "build_model", "register_model"]
