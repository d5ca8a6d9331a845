"""Shared fixtures: small datasets the tests write themselves in the real on-disk formats, a real
Fashion-MNIST subset, and tiny attack records that defenses can read."""
import contextlib
import gzip
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# the precision probe's cache (utils/engine/probe.py) goes to a fresh folder, not the user's cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="test-cache-")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device of the tests marked `device` (e.g. cuda): "
                     "`pytest -m device --device cuda` checks resume and same-seed reproducibility on a GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs on the device given by --device (default cpu)")


@pytest.fixture
def run_device(request):
    return request.config.getoption("--device")


def write_idx(path, array):
    """MNIST's idx format (uint8 data), gzipped."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + a.tobytes())


def write_mnist_like(root, name, x_train, y_train, x_test, y_test):
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", x_train)
    write_idx(folder / "train-labels-idx1-ubyte.gz", y_train)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x_test)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", y_test)
    return Path(root)


def synthetic_images(n, seed, k=10):
    """Learnable fake 28x28 data: each class is a bright bar at its own place, plus noise."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % k
    g.shuffle(y)
    x = g.integers(0, 60, size=(n, 28, 28))
    for c in range(k):
        x[y == c, 2 + 2 * c:4 + 2 * c, 4:24] += 150
    return x.clip(0, 255).astype(np.uint8), y.astype(np.uint8)


@pytest.fixture(scope="session")
def fake_root(tmp_path_factory):
    """A fake fashion_mnist (600 train / 200 test) in the idx format, under a temporary dataset_path."""
    root = tmp_path_factory.mktemp("data")
    xtr, ytr = synthetic_images(600, 0)
    xte, yte = synthetic_images(200, 1)
    return write_mnist_like(root, "fashion_mnist", xtr, ytr, xte, yte)


REAL_FMNIST = REPO / "data" / "fashion_mnist"


@pytest.fixture(scope="session")
def real_subset_root(tmp_path_factory):
    """The first 6,000 training and 2,000 test images of the real Fashion-MNIST (installed by sh/install.sh)."""
    from utils.data import load_dataset
    if not REAL_FMNIST.exists():
        pytest.skip("real Fashion-MNIST not installed (run sh/install.sh)")
    d = load_dataset("fashion_mnist", REPO / "data")
    root = tmp_path_factory.mktemp("real")
    return write_mnist_like(root, "fashion_mnist", d.x_train[:6000, 0].numpy(), d.y_train[:6000].numpy(),
                            d.x_test[:2000, 0].numpy(), d.y_test[:2000].numpy())


def make_record(path, root, attack="badnet", extra=()):
    import importlib
    mod = importlib.import_module(f"attack.{attack}")
    argv = ["--dataset", "fashion_mnist", "--dataset_path", str(root), "--save_folder_name", str(path),
            "--epochs", "1", "--batch_size", "64", *extra]
    return mod.main(argv)


@pytest.fixture(scope="session")
def tiny_record(tmp_path_factory, fake_root):
    """A complete BadNets record on the fake data (1 epoch): for defenses' plumbing tests."""
    path = tmp_path_factory.mktemp("rec") / "badnet_tiny"
    make_record(path, fake_root)
    return path


@pytest.fixture(scope="session")
def real_badnet_record(tmp_path_factory, real_subset_root):
    """A BadNets record on the real Fashion-MNIST subset, trained long enough to carry a working backdoor
    (about 20 s on 2 cores): for 'a short real run lowers ASR' tests."""
    path = tmp_path_factory.mktemp("realrec") / "badnet_real"
    s = make_record(path, real_subset_root, extra=["--epochs", "6", "--cos_t_max", "6", "--batch_size", "64"])
    assert s["test_asr"] > 0.9, s
    return path


@pytest.fixture(scope="session", autouse=True)
def repository_records_untouched():
    """No test may write into the repository's own record/ folder (they run in temporary folders and copies)."""
    before = sorted(p.name for p in (REPO / "record").iterdir()) if (REPO / "record").exists() else []
    yield
    after = sorted(p.name for p in (REPO / "record").iterdir()) if (REPO / "record").exists() else []
    assert after == before, f"tests wrote into {REPO / 'record'}: {sorted(set(after) - set(before))}"


@contextlib.contextmanager
def killed_after_checkpoint(when):
    """A run killed right after the checkpoint for which when(phase, epoch) holds (epoch: the phase's epochs done):
    the block must end in that KeyboardInterrupt, and the checkpoint is on disk for a --resume."""
    from utils.run_folder import Run
    original = Run.save_checkpoint

    def die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        if when(phase, epoch):
            raise KeyboardInterrupt
    Run.save_checkpoint = die
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        Run.save_checkpoint = original
