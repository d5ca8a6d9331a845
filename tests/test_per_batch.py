"""The shared machinery of attacks that control training (utils/per_batch.py): the per-batch count rule, the record's
representative set (the last epoch's draw, known before training), cross samples kept out of the defender's clean
pool, the epoch's figures split by kind, resume, and MultiStepLR. A toy trigger (the BadNets patch, with a cross
transform that brightens the image) stands in for WaNet, BppAttack and Input-Aware."""
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import attack.badnet as badnet
from tests.conftest import killed_after_checkpoint
from utils.attack import Training, run_attack
from utils.engine.augment import post_tensor_transform, to_unit
from utils.errors import UserError
from utils.per_batch import CROSS, POISONED, PerBatch, batch_count, check_last_epoch, last_epoch_positions, \
    per_batch_epoch, per_batch_state, plan_per_batch
from utils.poison import defender_clean_subset
from utils.record import load_attack_record
from utils.triggers import PatchTrigger, register_trigger


@register_trigger
@dataclass
class BrightPatch(PatchTrigger):
    """The patch, plus a cross transform: +gen-drawn brightness (uint8, saturating)."""
    kind: ClassVar[str] = "test_bright_patch"

    def cross(self, x_split, idx, pool, gen, train=True):
        add = torch.randint(1, 40, (len(idx), 1, 1, 1), generator=gen)
        return (x_split[idx].to(torch.int32) + add).clamp(0, 255).to(torch.uint8)


def counts(b, gen):
    n = batch_count(0.1, b, gen)
    return n, 2 * n


def training_of(rule, seen):
    def training(ctx):
        gen = rule.generator(ctx.cfg["random_seed"])

        def make_batch(idx, n_bd, n_cr):
            x, y = to_unit(ctx.x_clean[idx]), ctx.y_true[idx].clone()
            x[:n_bd] = to_unit(trigger.apply(ctx.x_clean[idx[:n_bd]]))
            y[:n_bd] = ctx.cfg["attack_target"]
            x[n_bd:n_bd + n_cr] = (x[n_bd:n_bd + n_cr] + 0.1).clamp(0, 1)
            return ctx.augment(x), y

        def epoch(c, e):
            row, where = per_batch_epoch(c, rule, gen, make_batch)
            seen.append((e, where))
            if e == c.cfg["epochs"]:
                check_last_epoch(c, where)
            return row
        return Training(epoch=epoch, state=per_batch_state(gen), show=("train_cross_acc_only",))
    trigger = BrightPatch(badnet.make_patch_trigger({"dataset": "fashion_mnist", "patch_mask_path": None,
                                                     "patch_size": 3, "patch_position": "bottom_right",
                                                     "patch_value": 255})[0].pattern)
    return trigger, training


def run(tmp_path, fake_root, name, extra=(), seen=None):
    rule = PerBatch(counts, "toy_batch", epochs=int(dict(zip(extra[::2], extra[1::2])).get("--epochs", 2)),
                    rule="floor(0.1 b) poisoned, twice as many cross")
    cfg, args, _, meta = badnet.configure(["--dataset_path", str(fake_root), "--save_folder_name", str(tmp_path / name),
                                           "--epochs", "2", "--batch_size", "50", "--lr", "0.05", *extra])
    trigger, training = training_of(rule, seen if seen is not None else [])
    return run_attack("toy", cfg, args, trigger, meta, training=training,
                      plan=lambda y, k: plan_per_batch(y, k, cfg, rule))


def test_the_count_rule():
    g = torch.Generator().manual_seed(0)
    assert batch_count(0.1, 128, g) == 12 and batch_count(0.1, 80, g) == 8 and batch_count(0.29, 100, g) == 28
    draws = [batch_count(0.001, 128, g) for _ in range(5000)]
    assert set(draws) == {0, 1} and abs(sum(draws) / 5000 - 0.128) < 0.015


def test_the_record_lists_the_last_epochs_draw_and_keeps_cross_samples_out_of_the_clean_pool(tmp_path, fake_root):
    seen = []
    s = run(tmp_path, fake_root, "toy", seen=seen)
    rec = load_attack_record(tmp_path / "toy")
    poison = json.loads((tmp_path / "toy" / "poison.json").read_text())
    data = rec.data
    bd, cross = torch.tensor(poison["poison_indices"]), torch.tensor(poison["cross_indices"])
    # 600 samples, batches of 50, drop_last: 12 batches of 5 poisoned and 10 cross samples each
    assert len(bd) == 60 and len(cross) == 120 and not set(bd.tolist()) & set(cross.tolist())
    assert poison["per_batch"]["full_batch"] == {"n_bd": 5, "n_cross": 10}
    # the last epoch (2) drew exactly these; the first epoch drew others
    last = {k: data.train_indices[v] for k, v in seen[-1][1].items()}
    assert torch.equal(last[POISONED], bd) and torch.equal(last[CROSS], cross)
    assert not torch.equal(data.train_indices[seen[0][1][POISONED]], bd)
    assert (data.y_train[bd] == 0).all() and torch.equal(data.y_train[cross], data.y_train_true[cross])
    assert (data.poison_indicator[cross] == 0).all()
    assert (data.x_train[cross] != data.x_train_clean[cross]).any()
    assert data.x_cross_test is not None and "cross_test_sha256" in poison["digests"]
    idx, source = defender_clean_subset(data, 0.5, False, 0)
    assert source == "unpoisoned" and not set(idx.tolist()) & (set(bd.tolist()) | set(cross.tolist()))
    assert "test_cross_acc" in s


def test_the_epoch_figures_are_split_by_kind(tmp_path, fake_root):
    s = run(tmp_path, fake_root, "toy", extra=["--epochs", "1"])
    import pandas as pd
    row = pd.read_csv(tmp_path / "toy" / "metrics.csv").iloc[-1]
    assert row["n_bd_epoch"] == 60 and row["n_cross_epoch"] == 120
    assert 0 <= row["train_cross_acc_only"] <= 1 and 0 <= row["train_asr_bd_only"] <= 1
    assert s["test_cross_acc"] == pytest.approx(row["test_cross_acc"])


def test_resume_equals_an_uninterrupted_run(tmp_path, fake_root):
    whole = run(tmp_path, fake_root, "whole", extra=["--epochs", "3"])
    with killed_after_checkpoint(lambda phase, epoch: epoch == 1):
        run(tmp_path, fake_root, "cut", extra=["--epochs", "3"])
    resumed = run(tmp_path, fake_root, "cut", extra=["--epochs", "3", "--resume"])
    for k in ("test_acc", "test_asr", "test_ra", "test_cross_acc"):
        assert whole[k] == resumed[k]
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_p_num_is_refused():
    with pytest.raises(UserError, match="p_num does not apply"):
        plan_per_batch(torch.zeros(10, dtype=torch.int64), 10, {"p_num": 3}, None)


def test_replaying_the_streams_matches_an_epoch_loop():
    rule = PerBatch(counts, "toy_batch", epochs=3, rule="")
    bd, cr = last_epoch_positions(100, 30, False, 7, rule)
    # batches 30, 30, 30, 10: 3 + 3 + 3 + 1 poisoned, twice as many cross
    assert len(bd) == 10 and len(cr) == 20 and not set(bd.tolist()) & set(cr.tolist())
    assert torch.equal(last_epoch_positions(100, 30, False, 7, rule)[0], bd)


def test_multistep_lr_in_the_factory():
    from utils.engine.optim import make_scheduler
    p = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(p, lr=0.01)
    sched = make_scheduler(opt, {"lr_scheduler": "MultiStepLR", "steplr_milestones": [2, 3], "steplr_gamma": 0.1})
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.0001])


def test_the_wanet_augmentation_is_per_sample_with_black_fill():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(64, 1, 8, 8)
    y = post_tensor_transform(x, g, padding=2, degrees=0, flip=False, p_crop=1.0)
    assert (y == 0).any() and ((y == 0) | (y == 1)).all()              # zero padding shows, nothing else changes
    shifted = [(y[i] == 0).nonzero().tolist() for i in range(64)]
    assert len({str(s) for s in shifted}) > 5                            # per-sample offsets
    assert torch.equal(post_tensor_transform(x, g, padding=2, degrees=10, flip=False, p_crop=0.0, p_rotate=0.0), x)
