"""BppAttack (docs/specs/bpp.md §9): squeezing in exact integers against hand values and a float64 reference,
Floyd-Steinberg dithering against the hand-computed example and a per-pixel scalar reference, the batch assembly
(labels, kinds, negatives), the count rule and the configuration checks, a reserve that never enters training, a
record that rebuilds bit for bit (noise test set included) with noise samples outside the defender's clean pool,
and resume."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from attack import bpp
from tests.conftest import killed_after_checkpoint, make_record
from utils.errors import UserError
from utils.poison import defender_clean_subset
from utils.record import load_attack_record
from utils.seeding import generator


def one(values, s, dithering=False):
    x = torch.tensor(values, dtype=torch.uint8).reshape(1, 1, 1, -1)
    return bpp.BppTrigger(s, dithering).apply(x).flatten().tolist()


# --- squeezing (§5.1) ------------------------------------------------------------------------------------------------

def test_plain_squeezing_hand_values():
    ends = [18, 19, 54, 55, 91, 92, 127, 128, 163, 164, 200, 201, 236, 237, 0, 255, 100]
    assert one(ends, 8) == [0, 36, 36, 73, 73, 109, 109, 146, 146, 182, 182, 219, 219, 255, 0, 255, 109]
    t = bpp.squeeze_table(8).long()
    assert (t - torch.arange(256)).abs().max() == 18
    assert one([100], 32) == [99] and one([128, 127], 3) == [128, 128]   # s = 3: the level 127.5, ties to even


def test_the_integer_formula_equals_a_float64_reference_for_every_value_and_s():
    u = np.arange(256, dtype=np.float64)
    for s in range(2, 256):
        ref = np.round(np.round(u * (s - 1) / 255) * 255 / (s - 1))
        assert np.array_equal(bpp.squeeze_table(s).numpy(), ref.astype(np.uint8)), s


# --- dithering (§5.2) ------------------------------------------------------------------------------------------------

def dither_reference(img: np.ndarray, s: int) -> np.ndarray:
    """§5.2 written out pixel by pixel in Python floats, one image (C, H, W), one channel after the other."""
    c_, h, w = img.shape
    out = np.zeros_like(img)
    for ch in range(c_):
        v = [[float(img[ch, r, c]) for c in range(w)] for r in range(h)]
        for r in range(h):
            for c in range(w):
                old = v[r][c]
                k = round(old / 255 * (s - 1))
                level = k / (s - 1) * 255
                e = old - level
                v[r][c] = level
                if c + 1 < w:
                    v[r][c + 1] += e * 7 / 16
                if r + 1 < h and c + 1 < w:
                    v[r + 1][c + 1] += e * 1 / 16
                if r + 1 < h:
                    v[r + 1][c] += e * 5 / 16
                if r + 1 < h and c > 0:
                    v[r + 1][c - 1] += e * 3 / 16
        out[ch] = np.clip(np.round(np.array(v)), 0, 255)
    return out


def test_the_hand_computed_dithering_example():
    x = torch.full((1, 1, 2, 3), 100, dtype=torch.uint8)
    assert bpp.BppTrigger(8, True).apply(x)[0, 0].tolist() == [[109, 109, 109], [109, 73, 109]]
    assert bpp.BppTrigger(8, False).apply(x)[0, 0].tolist() == [[109] * 3] * 2
    assert dither_reference(x[0].numpy(), 8)[0].tolist() == [[109, 109, 109], [109, 73, 109]]


def test_dithering_equals_the_scalar_reference_and_its_properties():
    g = torch.Generator().manual_seed(0)
    for s in (2, 8, 32):
        x = torch.randint(0, 256, (6, 3, 4, 5), generator=g, dtype=torch.uint8)
        got = bpp.dither(x, s)
        for i in range(len(x)):
            assert np.array_equal(got[i].numpy(), dither_reference(x[i].numpy(), s)), (s, i)
        # channels independent: the RGB batch equals its channels squeezed one by one
        assert torch.equal(got, torch.cat([bpp.dither(x[:, c:c + 1], s) for c in range(3)], 1))
    # a 1 x W row is the 1-D recurrence with weight 7/16 only
    row = torch.randint(0, 256, (1, 1, 1, 9), generator=g, dtype=torch.uint8)
    v, want = row.flatten().double().tolist(), []
    for i in range(9):
        level = round(v[i] / 255 * 7) / 7 * 255
        want.append(min(255, max(0, round(level))))
        if i + 1 < 9:
            v[i + 1] += (v[i] - level) * 7 / 16
    assert bpp.dither(row, 8).flatten().tolist() == want
    for c in (0, 255):
        flat = torch.full((2, 1, 5, 5), c, dtype=torch.uint8)
        assert torch.equal(bpp.dither(flat, 8), flat)


# --- one batch (§5.3) ------------------------------------------------------------------------------------------------

def test_batch_assembly_labels_kinds_and_negatives():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (20, 1, 4, 4), generator=g, dtype=torch.uint8)
    x[17, 0, 0, :2] = torch.tensor([128, 127], dtype=torch.uint8)   # source 17: r = +18, -18 at two pixels
    x[3, 0, 0, 0], x[12, 0, 0, 1] = 250, 5
    sq = bpp.squeeze(x, 8)
    y = torch.arange(20) % 10
    idx = torch.tensor([5, 9, 3, 12, 0, 7, 1, 2, 4, 6])             # b = 10
    rule = bpp.per_batch_rule({"pratio": 0.2, "neg_ratio": 0.3, "epochs": 1})
    n_bd, n_neg = rule.counts(10, g)
    assert (n_bd, n_neg) == (2, 3)
    src = torch.tensor([17, 17, 11])
    xb, yb = bpp.assemble(x, sq, y, idx, n_bd, n_neg, src, lambda t: torch.full_like(t, 0))
    assert torch.equal(xb[:2], sq[idx[:2]]) and yb[:2].tolist() == [0, 0]
    want = (x[idx[2:5]].int() + sq[src].int() - x[src].int()).clamp(0, 255).to(torch.uint8)
    assert torch.equal(xb[2:5], want) and torch.equal(yb[2:], y[idx[2:]])
    assert xb[2, 0, 0, 0] == 255 and xb[3, 0, 0, 1] == 0               # 250 + 18 and 5 - 18 clipped
    assert torch.equal(xb[5:], x[idx[5:]])
    all2all = bpp.assemble(x, sq, y, idx, n_bd, n_neg, src, lambda t: (t + 1) % 10)[1]
    assert torch.equal(all2all[:2], (y[idx[:2]] + 1) % 10)


def test_the_count_rule_below_one_and_the_checks(fake_root):
    rule = bpp.per_batch_rule({"pratio": 0.1, "neg_ratio": 0.3, "epochs": 1})
    g = torch.Generator().manual_seed(0)
    draws = [rule.counts(4, g) for _ in range(4000)]
    assert {d[0] for d in draws} == {0, 1} and abs(np.mean([d[0] for d in draws]) - 0.4) < 0.03
    assert {d[1] for d in draws} == {1}                              # n_neg does not depend on n_bd
    base = ["--dataset_path", str(fake_root)]
    with pytest.raises(UserError, match="exceeds 1"):
        bpp.configure(base + ["--pratio", "0.6", "--neg_ratio", "0.5"])
    for s in ("1", "256"):
        with pytest.raises(UserError, match=r"squeeze_num .*allowed: \[2, 255\]"):
            bpp.configure(base + ["--squeeze_num", s])
    with pytest.raises(UserError, match="p_num does not apply"):
        bpp.configure(base + ["--p_num", "10"])
    cfg = bpp.configure(["--dataset", "cifar10"])[0]                # BackdoorBench's recipe over the prototype
    assert (cfg["lr"], cfg["lr_scheduler"], cfg["steplr_milestones"], cfg["steplr_gamma"], cfg["drop_last"]) == \
        (0.01, "MultiStepLR", [100, 200, 300, 400], 0.1, False)
    assert cfg["bpp_augment"] == "original" and cfg["crop_padding"] == 5


# --- runs on the fake data -------------------------------------------------------------------------------------------

FP32 = ["--amp", "false", "--channels_last", "false"]   # no precision probe: seconds saved, nothing else changes


def bpp_record(path, root, extra):
    return make_record(path, root, "bpp", extra=FP32 + extra)


def test_the_record_rebuilds_bit_for_bit_and_noise_stays_out_of_the_clean_pool(tmp_path, fake_root):
    path = tmp_path / "bpp"
    s = bpp_record(path, fake_root, ["--dithering", "true", "--squeeze_num", "4"])
    poison = json.loads((path / "poison.json").read_text())
    rec = load_attack_record(path)                                  # checks every digest itself
    d = rec.data
    bd, noise = torch.tensor(poison["poison_indices"]), torch.tensor(poison["cross_indices"])
    # 600 samples in batches of 64 (drop_last false: 9 x 64 + 24): 6 + 2 poisoned, 6 + 2 noise per batch
    assert len(bd) == 9 * 6 + 2 and len(noise) == 9 * 6 + 2 and not set(bd.tolist()) & set(noise.tolist())
    assert poison["trigger"]["kind"] == "bpp" and poison["per_batch"]["full_batch"] == {"n_bd": 6, "n_cross": 6}
    x = rec.dataset.x_train
    assert torch.equal(d.x_train[bd], bpp.dither(x[bd], 4)) and (d.y_train[bd] == 0).all()
    j = bpp.noise_sources(torch.arange(600), len(noise), generator(0, "trigger_cross_train"))
    assert torch.equal(d.x_train[noise], bpp.add_residual(x[noise], bpp.dither(x[j], 4), x[j]))
    assert torch.equal(d.y_train[noise], d.y_train_true[noise]) and (d.poison_indicator[noise] == 0).all()
    xt = rec.dataset.x_test
    assert torch.equal(d.x_bd_test, bpp.dither(xt[d.bd_test_indices], 4))
    jt = bpp.noise_sources(torch.arange(200), 200, generator(0, "trigger_cross_test"))
    assert torch.equal(d.x_cross_test, bpp.add_residual(xt, bpp.dither(xt[jt], 4), xt[jt]))
    assert "cross_test_sha256" in poison["digests"] and "test_cross_acc" in s
    row = pd.read_csv(path / "metrics.csv").iloc[-1]
    assert row["n_bd_epoch"] == len(bd) and row["n_cross_epoch"] == len(noise)
    meta = yaml.safe_load((path / "config.yaml").read_text())
    assert meta["poisoning"] == "per_batch" and meta["deviations"] == [
        "crop_padding = 1 (conventions §4: 4)", "squeeze_num = 4 (spec: 8)", "dithering = True (spec: False)"]
    idx, source = defender_clean_subset(d, 0.5, False, 0)
    assert source == "unpoisoned" and not set(idx.tolist()) & (set(bd.tolist()) | set(noise.tolist()))
    # another s or no dithering gives other images: the digests catch it
    for key, value in (("squeeze_num", 8), ("dithering", False)):
        changed = json.loads(json.dumps(poison))
        changed["trigger"][key] = value
        (path / "poison.json").write_text(json.dumps(changed))
        with pytest.raises(UserError, match="gave a different"):
            load_attack_record(path)


def test_the_reserve_never_enters_a_batch_nor_a_residual(tmp_path, fake_root, monkeypatch):
    seen, original = [], bpp.assemble

    def spy(x, squeezed, y, idx, n_bd, n_neg, sources, relabel):
        seen.append((idx.clone(), sources.clone()))
        return original(x, squeezed, y, idx, n_bd, n_neg, sources, relabel)
    monkeypatch.setattr(bpp, "assemble", spy)
    path = tmp_path / "bpp_reserve"
    # pratio 0.015: 0.96 expected per batch of 64, so the count is a Bernoulli draw that the record's replay follows
    bpp_record(path, fake_root, ["--reserve_ratio", "0.1", "--attack_label_trans", "all2all", "--neg_ratio", "0.3",
                                 "--pratio", "0.015", "--bpp_augment", "original"])
    rec = load_attack_record(path)
    reserve, tr = set(rec.data.reserve_indices.tolist()), rec.data.train_indices
    assert len(reserve) == 60 and len(tr) == 540
    used = torch.cat([torch.cat(p) for p in seen])
    assert len(seen) == 9 and not set(tr[used].tolist()) & reserve           # pool positions -> dataset indices
    assert sum(len(s) for _, s in seen) == 8 * 19 + int(0.3 * 28)           # 8 x 64 + 28: n_neg 19, then 8
    noise = rec.poison["cross_indices"]
    assert not set(noise) & reserve and not set(rec.poison["poison_indices"]) & reserve
    bd = torch.tensor(rec.poison["poison_indices"])
    assert 0 < len(bd) <= 9 and rec.poison["per_batch"]["full_batch"]["n_bd"] in (0, 1)
    assert rec.config["crop_padding"] == 5 and any("bpp_augment = original" in d for d in
                                                    yaml.safe_load((path / "config.yaml").read_text())["deviations"])
    assert torch.equal(rec.data.y_train[bd], (rec.data.y_train_true[bd] + 1) % 10)


@pytest.mark.device
def test_resume_equals_an_uninterrupted_run(tmp_path, fake_root, run_device):
    extra = ["--epochs", "2", "--neg_ratio", "0.2", "--device", run_device]
    whole = bpp_record(tmp_path / "whole", fake_root, extra)
    with killed_after_checkpoint(lambda phase, epoch: epoch == 1):
        bpp_record(tmp_path / "cut", fake_root, extra)
    resumed = bpp_record(tmp_path / "cut", fake_root, extra + ["--resume"])
    for k in ("test_acc", "test_asr", "test_ra", "test_cross_acc"):
        assert whole[k] == resumed[k]
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = pd.read_csv(tmp_path / "whole" / "metrics.csv"), pd.read_csv(tmp_path / "cut" / "metrics.csv")
    cols = ["train_loss", "n_bd_epoch", "n_cross_epoch", "test_cross_acc"]
    assert ma[cols].equals(mb[cols])
