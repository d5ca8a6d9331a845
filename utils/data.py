"""Datasets as uint8 tensors (N, C, H, W) plus int64 labels, read once from the standard on-disk formats
(utils/dataset_files.py, which also says the layouts) and cached in data/<name>/cache.pt so that later runs load in
about a second.

"""
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.dataset_files import read_raw
from utils.errors import UserError
from utils.io import atomic_torch_save

CACHE_VERSION = 1


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    shape: tuple  # (C, H, W)
    mean: tuple
    std: tuple
    hflip: bool  # horizontal flip in the standard training augmentation (conventions §4)
    n_train: int
    n_test: int


DATASETS = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (1, 28, 28), (0.5,), (0.5,), False, 60000, 10000),
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.5,), (0.5,), False, 60000, 10000),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), True, 50000, 10000),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), False, 50000, 10000),
    "gtsrb": DatasetInfo("gtsrb", 43, (3, 32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False, 39209, 12630),
    "tiny": DatasetInfo("tiny", 200, (3, 64, 64), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), False, 100000, 10000),
}


@dataclass
class Dataset:
    info: DatasetInfo
    x_train: torch.Tensor  # uint8 (N, C, H, W), the loader's native order
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self):
        return self.info.num_classes


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def labels_digest(y: torch.Tensor) -> str:
    return hashlib.sha256(y.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------

def load_dataset(name: str, root="data", download: bool = True, verbose: bool = True) -> Dataset:
    """The dataset as uint8 tensors; built from the raw files once, then read from the cache."""
    info = dataset_info(name)
    root = Path(root)
    cache = root / name / "cache.pt"
    if cache.exists():
        try:
            d = torch.load(cache, weights_only=True, map_location="cpu")
            if d.get("version") == CACHE_VERSION and tuple(d["x_train"].shape[1:]) == info.shape:
                return Dataset(info, d["x_train"], d["y_train"], d["x_test"], d["y_test"])
        except Exception:
            pass
        if verbose:
            print(f"{name}: cache {cache} is stale or damaged; rebuilding it from the raw files")
    xtr, ytr, xte, yte = read_raw(name, root, download)
    x_train, x_test = torch.from_numpy(np.ascontiguousarray(xtr)), torch.from_numpy(np.ascontiguousarray(xte))
    y_train, y_test = torch.from_numpy(np.asarray(ytr, dtype=np.int64)), torch.from_numpy(np.asarray(yte, dtype=np.int64))
    if tuple(x_train.shape[1:]) != info.shape or len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise UserError(f"dataset {name} under {root} has images of shape {tuple(x_train.shape[1:])} "
                        f"({len(x_train)} images, {len(y_train)} labels); expected {info.shape}")
    if int(y_train.max()) >= info.num_classes or int(y_train.min()) < 0:
        raise UserError(f"dataset {name} under {root} has labels outside 0..{info.num_classes - 1}; the files are damaged")
    try:
        os.makedirs(cache.parent, exist_ok=True)
        atomic_torch_save({"version": CACHE_VERSION, "x_train": x_train, "y_train": y_train,
                           "x_test": x_test, "y_test": y_test}, cache)
    except OSError as e:  # a read-only dataset folder still works, only slower
        if verbose:
            print(f"{name}: could not write the cache {cache} ({e}); continuing without it")
    return Dataset(info, x_train, y_train, x_test, y_test)

