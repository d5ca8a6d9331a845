"""Poisoned sets and clean subsets (conventions §7, §8, §13)."""
import math
from types import SimpleNamespace

import pytest
import torch

from utils.data import DATASETS
from utils.errors import UserError
from utils.poison import build_poisoned_data, defender_clean_subset, plan_poison
from utils.triggers import PatchTrigger, badnet_pattern


def fake_dataset(n=1000, n_test=300, k=10, shape=(3, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        num_classes=k, info=DATASETS["cifar10"],
        x_train=torch.randint(0, 200, (n, *shape), generator=g, dtype=torch.uint8),
        y_train=torch.arange(n) % k, x_test=torch.randint(0, 200, (n_test, *shape), generator=g, dtype=torch.uint8),
        y_test=torch.arange(n_test) % k)


def plan(d, **kw):
    args = dict(pratio=0.1, p_num=None, label_trans="all2one", target=0, shift=1, reserve_ratio=0.0,
                reserve_rule="random", seed=0)
    args.update(kw)
    return plan_poison(d.y_train, d.num_classes, **args)


def test_poison_count_is_round_pratio_times_pool_and_reproducible():
    d = fake_dataset()
    p = plan(d, pratio=0.1)
    assert len(p.poison_indices) == 100 and len(p.poison_indices.unique()) == 100
    assert torch.equal(p.poison_indices, plan(d, pratio=0.1).poison_indices)
    assert not torch.equal(p.poison_indices, plan(d, pratio=0.1, seed=1).poison_indices)
    assert len(plan(d, pratio=0.0125).poison_indices) == 13  # round(12.5) half up
    assert len(plan(d, p_num=7).poison_indices) == 7


def test_poison_draw_includes_target_class():
    d = fake_dataset(n=5000)
    p = plan(d, pratio=0.5)
    assert (d.y_train[p.poison_indices] == 0).sum() > 150  # about 1/K of 2500


def test_zero_poisoned_samples_is_an_error():
    with pytest.raises(UserError, match="poisons no sample"):
        plan(fake_dataset(n=100), pratio=0.001)


def test_reserve_is_balanced_and_never_poisoned():
    d = fake_dataset()
    p = plan(d, reserve_ratio=0.1, pratio=0.5)
    assert len(p.reserve_indices) == 100
    assert torch.bincount(d.y_train[p.reserve_indices], minlength=10).tolist() == [10] * 10
    assert not set(p.reserve_indices.tolist()) & set(p.poison_indices.tolist())
    assert len(p.poison_indices) == 450  # pratio of the 900 left to the attacker
    first = plan(d, reserve_ratio=0.1, reserve_rule="first")
    assert first.reserve_indices.tolist() == list(range(100))  # labels cycle 0..9: the first 10 of each class


def test_all2one_sets():
    d = fake_dataset()
    p = plan(d)
    data = build_poisoned_data(d, PatchTrigger(badnet_pattern((3, 32, 32))), p)
    idx = p.poison_indices
    assert (data.y_train[idx] == 0).all() and data.poison_indicator.sum() == 100
    assert (data.x_train[idx][:, :, -3:, -3:] == 255).all()
    clean = torch.ones(1000, dtype=torch.bool)
    clean[idx] = False
    assert torch.equal(data.x_train[clean], d.x_train[clean]) and torch.equal(data.y_train[clean], d.y_train[clean])
    assert len(data.y_bd_test) == 270 and (data.y_bd_test_true != 0).all() and (data.y_bd_test == 0).all()
    assert torch.equal(data.x_test, d.x_test)


def test_all2all_sets():
    d = fake_dataset()
    p = plan(d, label_trans="all2all", shift=1)
    data = build_poisoned_data(d, PatchTrigger(badnet_pattern((3, 32, 32))), p)
    idx = p.poison_indices
    assert torch.equal(data.y_train[idx], (d.y_train[idx] + 1) % 10)
    assert len(data.y_bd_test) == 300
    assert torch.equal(data.y_bd_test, (d.y_test + 1) % 10)
    p3 = plan(d, label_trans="all2all", shift=3)
    data3 = build_poisoned_data(d, PatchTrigger(badnet_pattern((3, 32, 32))), p3)
    assert torch.equal(data3.y_bd_test, (d.y_test + 3) % 10)


def test_cifar10_shaped_all2one_test_set_has_9000():
    d = fake_dataset(n=200, n_test=10000)
    data = build_poisoned_data(d, PatchTrigger(badnet_pattern((3, 32, 32))), plan(d, pratio=0.5))
    assert len(data.y_bd_test) == 9000


def _data(d, **kw):
    return build_poisoned_data(d, PatchTrigger(badnet_pattern((3, 32, 32))), plan(d, **kw))


def test_clean_subset_balanced_excludes_poisoned_and_is_reproducible():
    d = fake_dataset()
    data = _data(d, pratio=0.3)
    idx, source = defender_clean_subset(data, 0.1, True, seed=0)
    assert source == "unpoisoned" and len(idx) == 100
    assert torch.bincount(data.y_train_true[idx], minlength=10).tolist() == [10] * 10
    assert (data.poison_indicator[idx] == 0).all()
    assert torch.equal(idx, defender_clean_subset(data, 0.1, True, seed=0)[0])
    assert not torch.equal(idx, defender_clean_subset(data, 0.1, True, seed=1)[0])
    u, _ = defender_clean_subset(data, 0.05, False, seed=0)
    assert len(u) == math.floor(1000 * 0.05) and (data.poison_indicator[u] == 0).all()


def test_clean_subset_uses_the_reserve_and_reports_a_short_pool():
    d = fake_dataset()
    data = _data(d, reserve_ratio=0.05)
    idx, source = defender_clean_subset(data, 0.05, True, seed=0)
    assert source == "reserve" and set(idx.tolist()) <= set(data.reserve_indices.tolist())
    with pytest.raises(UserError, match="class 0 has 5 samples available but 10 are requested"):
        defender_clean_subset(data, 0.1, True, seed=0)


def test_index_file_overrides_and_warns_on_poisoned(tmp_path, capsys):
    d = fake_dataset()
    data = _data(d)
    poisoned = int(torch.nonzero(data.poison_indicator)[0])
    f = tmp_path / "idx.txt"
    f.write_text(f"3\n{poisoned}\n5\n")
    idx, source = defender_clean_subset(data, 0.1, True, 0, index_file=f)
    assert source == "index_file" and idx.tolist() == [3, poisoned, 5]
    assert "were poisoned" in capsys.readouterr().out
    f.write_text("3\nabc\n")
    with pytest.raises(UserError, match="one training index per line"):
        defender_clean_subset(data, 0.1, True, 0, index_file=f)
