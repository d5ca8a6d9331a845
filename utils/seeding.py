"""Seeding: one generator per random purpose, derived from the run's seed and the purpose's name, and the
determinism switches of the kernels.

Changing how one purpose draws (say, the clean subset) never shifts another (say, the poison indices).
"""
import hashlib
import os
import random
import warnings

import numpy as np
import torch


def derive_seed(seed: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, purpose: str, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, purpose))
    return g


def fix_random(seed: int):
    """Seed Python, NumPy and torch (BackdoorBench's fix_random)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_determinism(deterministic: bool, device):
    """deterministic: cuDNN's deterministic algorithms, no autotuning; on a GPU also torch's deterministic algorithms
    and the cuBLAS workspace that bitwise reproducibility needs, with a warning naming each op that has no
    deterministic kernel. CPU kernels are deterministic at a fixed thread count already, so nothing else changes
    there. False: cudnn.benchmark and torch's fastest kernels."""
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    on_gpu = torch.device(device).type == "cuda"
    if deterministic and on_gpu:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # read when cuBLAS starts, i.e. not yet
        torch.use_deterministic_algorithms(True, warn_only=True)
        warnings.filterwarnings("once", message=".*does not have a deterministic implementation.*")
    elif on_gpu or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)
