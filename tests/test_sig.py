"""SIG (docs/specs/sig.md §9): the sinusoid pixel-exact against the formula and hand values, truncation at the
nominal zeros, clean-label poisoning (target class only, labels kept), the feasibility error, a record that
rebuilds bit for bit."""
import json
import math

import numpy as np
import pytest
import torch

from attack import sig
from tests.conftest import make_record
from utils.errors import UserError
from utils.record import load_attack_record


def reference(x: np.ndarray, delta, f):
    """The spec's formula written out independently: float32 pattern over columns, float64 sum, clip, truncation."""
    w = x.shape[-1]
    v = np.array([delta * math.sin(2 * math.pi * j * f / w) for j in range(w)], dtype=np.float32)
    return np.clip(x.astype(np.float64) + v.astype(np.float64), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_the_sinusoid_matches_the_formula_bit_for_bit(shape):
    trig, _ = sig.make_trigger({"dataset": {28: "fashion_mnist", 32: "cifar10", 64: "tiny"}[shape[1]], "sig_delta": 40.0,
                                "sig_delta_test": None, "sig_f": 6.0})
    p = trig.pattern_train
    assert p.dtype == torch.float32 and p.shape == shape and p[..., 0].abs().max() == 0
    assert torch.equal(p, p[:1, :1].expand(shape))              # the same row everywhere, every channel
    x = torch.randint(0, 256, (5, *shape), dtype=torch.uint8)
    assert np.array_equal(trig.apply(x).numpy(), reference(x.numpy(), 40, 6))


def test_hand_values_truncation_and_the_nominal_zero():
    x = torch.full((1, 1, 1, 32), 100, dtype=torch.uint8)
    trig, _ = sig.make_trigger({"dataset": "cifar10", "sig_delta": 40.0, "sig_delta_test": None, "sig_f": 6.0})
    row = trig.apply(x.expand(1, 3, 32, 32).contiguous())[0, 0, 0].tolist()
    assert row[:9] == [100, 136, 128, 84, 60, 84, 128, 136, 100]   # 84, not 85: truncation, not rounding
    assert row[16] == 99                                            # sin(6 pi) is -7e-16 in float64: 100 -> 99
    w28, _ = sig.make_trigger({"dataset": "fashion_mnist", "sig_delta": 40.0, "sig_delta_test": 20.0, "sig_f": 6.0})
    y = w28.apply(torch.full((1, 1, 28, 28), 100, dtype=torch.uint8))[0, 0, 0].tolist()
    assert y[:9] == [100, 138, 117, 68, 68, 117, 138, 100, 61] and y[14] == 99
    z = w28.apply(torch.full((1, 1, 28, 28), 100, dtype=torch.uint8), train=False)[0, 0, 0].tolist()
    assert z[1] == 119 and torch.equal(w28.pattern_test, w28.pattern_train / 2)


def test_clean_label_poisoning_and_its_record(tmp_path, fake_root):
    path = tmp_path / "sig"
    s = make_record(path, fake_root, "sig", extra=["--pratio", "0.05"])
    rec = load_attack_record(path)
    poison = json.loads((path / "poison.json").read_text())
    idx = torch.tensor(poison["poison_indices"])
    assert len(idx) == 30 and poison["clean_label"] is True               # round(0.05 * 600)
    assert (rec.data.y_train_true[idx] == 0).all()                        # target-class samples only
    assert torch.equal(rec.data.y_train, rec.data.y_train_true)           # no label changed
    assert (rec.data.x_train[idx] != rec.data.x_train_clean[idx]).any()
    others = torch.ones(600, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(rec.data.x_train[others], rec.data.x_train_clean[others])
    assert (rec.data.y_bd_test_true != 0).all() and (rec.data.y_bd_test == 0).all()
    assert poison["target_class_size"] == 60 and poison["target_class_unpoisoned"] == 30
    assert "test_acc_target_class" in (path / "metrics.csv").read_text().splitlines()[0]
    assert 0 <= s["test_acc"] <= 1


def test_more_poison_than_the_target_class_holds_is_refused(tmp_path, fake_root):
    with pytest.raises(UserError, match=r"target class 0 has 60 .*at most 0\.1000"):
        make_record(tmp_path / "x", fake_root, "sig", extra=["--pratio", "0.2"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="all2one"):
        sig.configure(["--attack_label_trans", "all2all", "--dataset_path", str(fake_root)])
