"""Benchmark (not a test): BackdoorBench import and export times and file sizes on a CIFAR-10-shaped record
(50,000 + 10,000 synthetic images, PreAct-ResNet-18), written by the tests' BackdoorBench writer.

    python bench/bb_interop.py              # RAM mode; --mode disk writes PNG folders as BackdoorBench does
"""
import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from interop import backdoorbench as bb
from utils.errors import run_main


def fake_cifar(root, n_train, n_test):
    folder = Path(root) / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    per = n_train // 5
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", n_test)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": g.integers(0, 200, (n, 3072), dtype=np.uint8),
                         "labels": [int(v) for v in g.integers(0, 10, n)]}, f)
    return Path(root)


def size(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="ram", choices=("ram", "disk"))
    p.add_argument("--n_train", type=int, default=50_000)
    p.add_argument("--n_test", type=int, default=10_000)
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_interop as writer
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = fake_cifar(tmp / "data", a.n_train, a.n_test)
        t = time.perf_counter()
        src, *_ = writer.write_bb_record(tmp / "bb" / "badnet_bench", root, a.mode, n_train=a.n_train,
                                         n_test=a.n_test)
        written = time.perf_counter() - t
        t = time.perf_counter()
        bb.import_record(src, str(tmp / "ours"), root)
        imported = time.perf_counter() - t
        t = time.perf_counter()
        bb.export_record(tmp / "ours", tmp / "out" / "badnet_export", disk=a.mode == "disk")
        exported = time.perf_counter() - t
        print(f"\n| step ({a.mode} mode, {a.n_train:,} + {a.n_test:,} images) | seconds | size MiB |\n|---|---|---|\n"
              f"| BackdoorBench record written by the tests' writer | {written:.1f} | {size(src):.1f} |\n"
              f"| import (read, check, rebuild, evaluate, write our record) | {imported:.1f} | {size(tmp / 'ours'):.1f} |\n"
              f"| export (load our record, write attack_result.pt) | {exported:.1f} | "
              f"{size(tmp / 'out' / 'badnet_export'):.1f} |")


if __name__ == "__main__":
    run_main(main)
