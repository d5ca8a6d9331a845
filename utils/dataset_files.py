"""Readers of the standard on-disk dataset formats, one per format. Each returns (x_train, y_train, x_test, y_test)
as numpy arrays (images uint8 N, C, H, W); a missing or damaged file is one line saying where the files go.

Layouts under --dataset_path (default data/):
  fashion_mnist, mnist  <root>/<name>/ (or .../raw/): the four idx files, gzipped or not
  cifar10               <root>/cifar10/cifar-10-batches-py/ (the python version of the archive)
  cifar100              <root>/cifar100/cifar-100-python/
  gtsrb                 <root>/gtsrb/Train/<00000..00042>/GT-<class>.csv + images,
                        <root>/gtsrb/Test/GT-final_test.csv + images
  tiny                  <root>/tiny/tiny-imagenet-200/{train,val}
"""
import gzip
import pickle
from pathlib import Path

import numpy as np

from utils.download import DownloadError, download_archive, fetch
from utils.errors import UserError


IDX_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """MNIST's idx format: magic (0, 0, type 0x08 = uint8, ndim), big-endian sizes, raw data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}; the file is damaged: delete it and run `sh sh/install.sh` "
                        "(or download the dataset again)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an idx file of uint8 data; delete it and run `sh sh/install.sh`")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - start != expected:
        raise UserError(f"{path} is truncated or damaged ({len(raw) - start} data bytes, header says {expected}); "
                        "delete it and run `sh sh/install.sh`")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims).copy()


def _find_idx_folder(root: Path, name: str):
    candidates = [root / name, root / name / "raw", root / name / ("FashionMNIST" if name == "fashion_mnist" else "MNIST") / "raw"]
    for folder in candidates:
        if all(any((folder / (f + ext)).exists() for ext in ("", ".gz")) for f in IDX_FILES.values()):
            return folder
    return None


def _idx_path(folder: Path, stem: str) -> Path:
    return folder / stem if (folder / stem).exists() else folder / (stem + ".gz")


def read_mnist_like(root: Path, name: str, download: bool):
    folder, failure = _find_idx_folder(root, name), None
    if folder is None and download:
        folder, failure = _download_mnist_like(root, name)
    if folder is None:
        hint = ("run `sh sh/install.sh` (it copies Debian's dataset-fashion-mnist package there)"
                if name == "fashion_mnist" else "download them elsewhere and copy them there")
        raise UserError(f"dataset {name} not found{' (' + failure + ')' if failure else ''}: put the four idx files "
                        f"({', '.join(v + '[.gz]' for v in IDX_FILES.values())}) in {root / name}/ by hand; {hint}, "
                        "or point --dataset_path at the folder that holds them")
    arrays = {k: read_idx(_idx_path(folder, v)) for k, v in IDX_FILES.items()}
    return arrays["train_x"][:, None], arrays["train_y"], arrays["test_x"][:, None], arrays["test_y"]


def _download_mnist_like(root: Path, name: str):
    """The four idx files from torchvision's mirrors (its list and checksums) into <root>/<name>/raw/."""
    import torchvision
    cls = torchvision.datasets.FashionMNIST if name == "fashion_mnist" else torchvision.datasets.MNIST
    folder = root / name / "raw"
    print(f"{name}: not on disk, downloading into {folder} ...")
    for filename, md5 in cls.resources:
        for i, mirror in enumerate(cls.mirrors):
            try:
                fetch(mirror + filename, folder / filename, md5)
                break
            except DownloadError as e:
                print(f"{name}: {e}")
                if e.timed_out or i == len(cls.mirrors) - 1:
                    return None, str(e)
    return _find_idx_folder(root, name), None


def _unpickle(path: Path):
    # The CIFAR archives are python pickles of plain dicts (the published format); they are a dataset
    # the user downloaded, never a record, and are read once to build the uint8 cache.
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:
        raise UserError(f"cannot read {path}: {e}; the file is damaged: delete it and download the dataset again") from None


CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}


def read_cifar(root: Path, name: str, download: bool):
    folder_name, train_files, test_files, label_key, url, md5 = CIFAR[name]
    folder = root / name / folder_name
    needed = [folder / f for f in train_files + test_files]
    failure = None
    if not all(p.exists() for p in needed) and download:
        failure = download_archive(url, root / name, md5, name)
    missing = [p for p in needed if not p.exists()]
    if missing:
        raise UserError(f"dataset {name} not found{' (' + failure + ')' if failure else ''}: expected {missing[0]}; "
                        f"download the python version of the archive ({url}) elsewhere, extract it into {root / name}/ "
                        "by hand, or point --dataset_path at the folder that holds it")

    def load(files):
        xs, ys = [], []
        for f in files:
            d = _unpickle(folder / f)
            try:
                xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[label_key], dtype=np.int64))
            except (KeyError, ValueError) as e:
                raise UserError(f"{folder / f} is not a CIFAR batch file ({e}); download the dataset again") from None
        return np.concatenate(xs), np.concatenate(ys)

    return (*load(train_files), *load(test_files))


def _load_image(path: Path, size, channels):
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.array(im, dtype=np.uint8)
    except Exception as e:
        raise UserError(f"cannot read image {path}: {e}; the dataset is damaged: extract it again") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def read_gtsrb(root: Path, download: bool):
    import csv
    base = root / "gtsrb"
    test_csv = base / "Test" / "GT-final_test.csv"
    if not (base / "Train").is_dir() or not test_csv.exists():
        raise UserError(f"dataset gtsrb not found: expected {base}/Train/<00000..00042>/GT-<class>.csv with the images "
                        f"and {test_csv} with the test images (the official GTSRB archives; there is no automatic "
                        "download); put them there or point --dataset_path at them")

    def rows(csv_path):
        with open(csv_path, newline="") as f:
            return list(csv.DictReader(f, delimiter=";"))

    xs, ys = [], []
    for class_dir in sorted(p for p in (base / "Train").iterdir() if p.is_dir()):
        gt = class_dir / f"GT-{class_dir.name}.csv"
        if not gt.exists():
            raise UserError(f"gtsrb: {gt} missing; extract the training archive again")
        for r in rows(gt):
            xs.append(_load_image(class_dir / r["Filename"], (32, 32), 3))
            ys.append(int(r["ClassId"]))
    xt, yt = [], []
    for r in rows(test_csv):
        xt.append(_load_image(base / "Test" / r["Filename"], (32, 32), 3))
        yt.append(int(r["ClassId"]))
    return np.stack(xs), np.array(ys), np.stack(xt), np.array(yt)


def read_tiny(root: Path, download: bool):
    base = root / "tiny" / "tiny-imagenet-200"
    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    failure = None
    if not (base / "train").is_dir() and download:
        failure = download_archive(url, root / "tiny", None, "tiny")
    if not (base / "train").is_dir() or not (base / "val").is_dir():
        raise UserError(f"dataset tiny not found{' (' + failure + ')' if failure else ''}: expected {base}/train and "
                        f"{base}/val; download {url} elsewhere and extract it into {root / 'tiny'}/ by hand, or point "
                        "--dataset_path at the folder that holds it")
    wnids_file = base / "wnids.txt"
    wnids = (wnids_file.read_text().split() if wnids_file.exists()
             else sorted(p.name for p in (base / "train").iterdir() if p.is_dir()))
    index = {w: i for i, w in enumerate(wnids)}

    def images_in(folder):
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))

    xs, ys = [], []
    for w in wnids:
        for p in images_in(base / "train" / w):
            xs.append(_load_image(p, (64, 64), 3))
            ys.append(index[w])
    xt, yt = [], []
    ann = base / "val" / "val_annotations.txt"
    if ann.exists() and (base / "val" / "images").is_dir():  # the official layout: val/images + annotations
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                xt.append(_load_image(base / "val" / "images" / parts[0], (64, 64), 3))
                yt.append(index[parts[1]])
    else:  # val reorganised into class folders
        for w in wnids:
            for p in images_in(base / "val" / w):
                xt.append(_load_image(p, (64, 64), 3))
                yt.append(index[w])
    return np.stack(xs), np.array(ys), np.stack(xt), np.array(yt)


def read_raw(name: str, root: Path, download: bool):
    if name in ("fashion_mnist", "mnist"):
        return read_mnist_like(root, name, download)
    if name in CIFAR:
        return read_cifar(root, name, download)
    if name == "gtsrb":
        return read_gtsrb(root, download)
    return read_tiny(root, download)
