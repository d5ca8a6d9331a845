"""Seeding: one generator per random purpose, derived from the run's seed and the purpose's name.

Changing how one purpose draws (say, the clean subset) never shifts another (say, the poison indices).
"""
import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, purpose: str, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, purpose))
    return g


def fix_random(seed: int, deterministic: bool = True):
    """Seed Python, NumPy and torch; cuDNN deterministic (BackdoorBench's fix_random)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
