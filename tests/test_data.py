"""Datasets read from their standard on-disk formats (small files written here), cache, and clear errors."""
import csv
import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_mnist_like
from utils.data import load_dataset
from utils.errors import UserError


def test_idx_gz_and_plain_and_cache(tmp_path):
    g = np.random.default_rng(0)
    xtr, ytr = g.integers(0, 256, (50, 28, 28)), g.integers(0, 10, 50)
    xte, yte = g.integers(0, 256, (20, 28, 28)), g.integers(0, 10, 20)
    root = write_mnist_like(tmp_path, "mnist", xtr, ytr, xte, yte)
    d = load_dataset("mnist", root, download=False)
    assert d.x_train.shape == (50, 1, 28, 28) and d.x_train.dtype == torch.uint8
    assert np.array_equal(d.x_train[:, 0].numpy(), xtr) and np.array_equal(d.y_test.numpy(), yte)
    assert (root / "mnist" / "cache.pt").exists()
    # the cache is read next time, even without the raw files
    for f in (root / "mnist").glob("*.gz"):
        f.rename(f.with_suffix(""))  # and plain (un-gzipped) names are accepted too
    (root / "mnist" / "cache.pt").unlink()
    for f in (root / "mnist").glob("*-ubyte"):
        f.write_bytes(gzip.decompress(f.read_bytes()))
    d2 = load_dataset("mnist", root, download=False)
    assert torch.equal(d.x_train, d2.x_train)


def test_missing_dataset_names_the_files_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.*sh sh/install.sh"):
        load_dataset("fashion_mnist", tmp_path, download=False)
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path, download=False)
    with pytest.raises(UserError, match="GT-final_test.csv"):
        load_dataset("gtsrb", tmp_path, download=False)
    with pytest.raises(UserError, match="unknown dataset 'imagenet'; known datasets"):
        load_dataset("imagenet", tmp_path)


def test_truncated_idx_file_is_reported(tmp_path):
    g = np.random.default_rng(0)
    root = write_mnist_like(tmp_path, "fashion_mnist", g.integers(0, 256, (10, 28, 28)), np.arange(10),
                            g.integers(0, 256, (5, 28, 28)), np.arange(5))
    f = root / "fashion_mnist" / "train-images-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(gzip.decompress(f.read_bytes())[:-100]))
    with pytest.raises(UserError, match="truncated or damaged"):
        load_dataset("fashion_mnist", root, download=False)
    f.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="damaged"):
        load_dataset("fashion_mnist", root, download=False)


def test_damaged_cache_is_rebuilt(tmp_path, capsys):
    g = np.random.default_rng(0)
    root = write_mnist_like(tmp_path, "mnist", g.integers(0, 256, (10, 28, 28)), np.arange(10),
                            g.integers(0, 256, (5, 28, 28)), np.arange(5))
    load_dataset("mnist", root, download=False)
    (root / "mnist" / "cache.pt").write_bytes(b"garbage")
    d = load_dataset("mnist", root, download=False)
    assert len(d.y_train) == 10 and "rebuilding" in capsys.readouterr().out


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = g.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = list(g.integers(0, 10, 4))
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        batches.append((data, labels))
    d = load_dataset("cifar10", tmp_path, download=False)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    # row-major CHW: the first 1024 bytes are the red channel
    assert np.array_equal(d.x_train[0, 0].flatten().numpy(), batches[0][0][0, :1024])
    assert d.y_train.tolist() == sum((b[1] for b in batches[:5]), [])


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ["train", "test"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.zeros((3, 3072), np.uint8), "fine_labels": [5, 99, 0], "coarse_labels": [1, 2, 3]}, f)
    d = load_dataset("cifar100", tmp_path, download=False)
    assert d.y_train.tolist() == [5, 99, 0]


def test_gtsrb_official_layout_resized_to_32(tmp_path):
    base = tmp_path / "gtsrb"
    for c in range(2):
        folder = base / "Train" / f"{c:05d}"
        folder.mkdir(parents=True)
        with open(folder / f"GT-{c:05d}.csv", "w", newline="") as f:
            w = csv.writer(f, delimiter=";")
            w.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
            for i in range(3):
                Image.new("RGB", (40 + i, 35), (c * 100, 10, 20)).save(folder / f"{i:05d}.ppm")
                w.writerow([f"{i:05d}.ppm", 40 + i, 35, 0, 0, 39, 34, c])
    (base / "Test").mkdir()
    with open(base / "Test" / "GT-final_test.csv", "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        Image.new("RGB", (50, 50), (1, 2, 3)).save(base / "Test" / "00000.ppm")
        w.writerow(["00000.ppm", 50, 50, 0, 0, 49, 49, 1])
    d = load_dataset("gtsrb", tmp_path, download=False)
    assert d.x_train.shape == (6, 3, 32, 32) and d.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.x_test.shape == (1, 3, 32, 32) and d.x_train[3, 0, 5, 5] == 100


def test_tiny_imagenet_with_val_annotations(tmp_path):
    base = tmp_path / "tiny" / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (base).mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids))
    for k, w in enumerate(wnids):
        (base / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (k * 50, 0, 0)).save(base / "train" / w / "images" / f"{w}_{i}.JPEG", "PNG")
    (base / "val" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), (0, 0, 0)).save(base / "val" / "images" / "val_0.JPEG", "PNG")
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")
    d = load_dataset("tiny", tmp_path, download=False)
    assert d.x_train.shape == (4, 3, 64, 64) and d.y_train.tolist() == [0, 0, 1, 1] and d.y_test.tolist() == [1]
