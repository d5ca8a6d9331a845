"""PDB (pdb.md §13): the stamp, the label mapping, the defensive data, the augmentation, the record round trip,
and a short real run that lowers ASR."""
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from defense import pdb
from defense.pdb_model import DefendedModel, defensive_mask
from models import build_model
from utils.engine import augment
from utils.engine.device import Precision
from utils.engine.evaluate import EvalSets, evaluate_backdoor
from utils.errors import UserError
from utils.model_file import load_defense_model, load_model_file
from utils.record import load_attack_record


def cnn(k=10, c=1):
    torch.manual_seed(0)
    return build_model("cnn", k, c, (0.5,) * c, (0.5,) * c).eval()


def pixel_set(mask):
    """(row, col) pairs of a (1, C, H, W) mask, after checking it is the same on every channel."""
    m = mask[0]
    assert all(torch.equal(m[0], m[i]) for i in range(len(m)))
    return {tuple(p) for p in m[0].nonzero().tolist()}


# --- the stamp -------------------------------------------------------------------------------------------

def test_stamp_writes_the_square_and_nothing_else():
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32)
    d = DefendedModel(cnn(10, 3), (3, 32, 32))
    x_before = x.clone()
    s = d.stamp(x)
    assert (s[:, :, :7, :7] == 2.0).all()
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[:7, :7] = False
    assert torch.equal(s[:, :, outside], x[:, :, outside])   # bit-identical
    assert torch.equal(x, x_before)                           # the input is not modified in place
    with pytest.raises(UserError, match="float pixel-space"):
        d.stamp((x * 255).to(torch.uint8))                    # 2.0 does not fit a uint8 image


def test_frame_and_dotted_masks():
    frame32 = {(r, c) for r in range(32) for c in range(32) if r in (0, 31) or c in (0, 31)}
    assert pixel_set(defensive_mask((3, 32, 32), 0, border_width=1)) == frame32
    frame64 = {(r, c) for r in range(64) for c in range(64) if min(r, c) < 5 or max(r, c) > 58}
    assert pixel_set(defensive_mask((3, 64, 64), 0, border_width=5)) == frame64
    dotted = ({(r, c) for r in range(0, 32, 2) for c in (0, 31)} | {(r, c) for c in range(0, 32, 2) for r in (0, 31)})
    assert pixel_set(defensive_mask((3, 32, 32), 2)) == dotted
    assert pixel_set(defensive_mask((3, 64, 64), 1)) == {(r, c) for r in range(7) for c in range(7)}


def test_value_2_reaches_the_normalisation_layer():
    d = DefendedModel(cnn(), (1, 28, 28))
    seen = {}
    d.inner.normalize.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    d(torch.rand(2, 1, 28, 28))
    assert (seen["x"][:, :, :7, :7] == 2.0).all()
    assert seen["x"].max().item() == 2.0


def test_value_2_reaches_the_network_in_training_and_evaluation_with_amp_and_channels_last():
    """The real paths: a PDB training epoch (defensive samples stamped, augmented, batched) and the evaluator, in the
    default precision (bf16 autocast where the CPU has it, channels_last)."""
    prec = Precision(torch.device("cpu"), amp=True, channels_last=True)
    d = DefendedModel(prec.prepare_model(cnn()), (1, 28, 28))
    maxima = []
    d.inner.normalize.register_forward_pre_hook(lambda m, args: maxima.append(args[0].max().item()))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    x_def = d.stamp(x[:8].float() / 255)
    stream = pdb.Stream(SimpleNamespace(x_train=x, y_train=y), x_def, (y[:8] + 1) % 10, "cpu")
    cfg = {o.name: o.default for o in pdb.OPTIONS}
    cfg.update(batch_size=32, scale_prob=0.0, rotate_prob=0.0)   # unscaled, unrotated: the stamp keeps 2.0 exactly
    opt = torch.optim.SGD(d.inner.parameters(), lr=0.01)
    pdb.train_epoch(d.inner, stream, opt, None, prec, torch.Generator().manual_seed(1),
                    torch.Generator().manual_seed(2), cfg)
    assert maxima and max(maxima) == 2.0
    maxima.clear()
    sets = SimpleNamespace(x_test=x, y_test=y, x_bd=x, y_bd=y, y_bd_true=y, num_classes=10)
    evaluate_backdoor(d, sets, prec, 32)
    assert maxima and all(m == 2.0 for m in maxima)


# --- the mapping -----------------------------------------------------------------------------------------

class ObeysTheTrigger(nn.Module):
    """Logits one_hot(h(c)) when the defensive trigger is present, one_hot(0) (the attack target) otherwise;
    the class c is written in the bottom-right pixel as c / 100."""

    def __init__(self, k, shift):
        super().__init__()
        self.num_classes, self.feature_dim, self.shift = k, 4, shift
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        c = (x[:, 0, -1, -1] * 100).round().long()
        cls = torch.where(x[:, 0, 0, 0] == 2.0, (c + self.shift) % self.num_classes, torch.zeros_like(c))
        return nn.functional.one_hot(cls, self.num_classes).float() + self.w


@pytest.mark.parametrize("k,K", [(1, 10), (3, 10), (7, 43)])
def test_defended_model_recovers_every_class(k, K):
    x = torch.rand(K, 1, 28, 28) * 0.5
    x[:, 0, -1, -1] = torch.arange(K) / 100
    d = DefendedModel(ObeysTheTrigger(K, k), (1, 28, 28), target_type=k)
    assert torch.equal(d(x).argmax(1), torch.arange(K))


@pytest.mark.parametrize("k", [1, 2, 5, 9, 11])
def test_defended_logits_are_the_shift(k):
    K = 10
    inner = cnn(K)
    d = DefendedModel(inner, (1, 28, 28), target_type=k)
    x = torch.rand(3, 1, 28, 28)
    z = inner(d.stamp(x))
    zd = d(x)
    for i in range(K):
        assert torch.equal(zd[:, i], z[:, (i + k) % K])
    logits, feats = d.forward_with_features(x)
    assert torch.allclose(logits, zd, atol=1e-6) and feats.shape == (3, d.feature_dim)


@pytest.mark.parametrize("k", [0, 10, -20])
def test_identity_shift_is_rejected(k):
    with pytest.raises(UserError, match="multiple of K"):
        DefendedModel(cnn(10), (1, 28, 28), target_type=k)


def test_head_editing_methods_refuse_the_defended_model():
    d = DefendedModel(cnn(), (1, 28, 28))
    assert not hasattr(d, "head")
    with pytest.raises(UserError, match="PDB defended model"):
        d.head_parameters()
    with pytest.raises(UserError, match="PDB defended model"):
        d.backbone_parameters()


# --- the defensive data ----------------------------------------------------------------------------------

def fake_cifar_data(reserve=0):
    """CIFAR-10-sized label structure (50,000 samples, 10 classes, all2one 10% to class 0) on tiny 3x8x8 images
    whose pixels encode the index, so that clean and poisoned copies can be told apart."""
    n, k = 50000, 10
    g = torch.Generator().manual_seed(0)
    y_true = torch.arange(n) % k
    y_true = y_true[torch.randperm(n, generator=g)]
    x_clean = (torch.arange(n) % 200).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()
    res = torch.empty(0, dtype=torch.int64)
    if reserve:
        res = torch.cat([torch.nonzero(y_true == c).flatten()[:reserve] for c in range(k)]).sort().values
    pool = torch.ones(n, dtype=torch.bool)
    pool[res] = False
    train = torch.arange(n)[pool]
    poison = train[torch.randperm(len(train), generator=g)[:round(0.1 * len(train))]]
    x, y, ind = x_clean.clone(), y_true.clone(), torch.zeros(n, dtype=torch.int64)
    x[poison, :, -2:, -2:] = 255
    y[poison], ind[poison] = 0, 1
    return SimpleNamespace(x_train=x, y_train=y, y_train_true=y_true, poison_indicator=ind, train_indices=train,
                           reserve_indices=res, x_train_clean=x_clean, num_classes=k), poison


def small_defended(k=1):
    return DefendedModel(build_model("cnn", 10, 3, (0.5,) * 3, (0.5,) * 3, 4), (3, 8, 8), square_size=3, target_type=k)


@pytest.mark.parametrize("source", ["clean_original", "poisoned"])
def test_defensive_counts_sources_and_labels(source):
    data, poison = fake_cifar_data()
    idx, src = pdb.select_defensive(data, 0.1, source, seed=0)
    assert src == source and len(idx) == 5000 and len(set(idx.tolist())) == 5000
    # quotas are filled by poisoned-set label, as the original: 500 per class
    assert torch.equal(torch.bincount(data.y_train[idx], minlength=10), torch.full((10,), 500))
    x_def, y_def = pdb.defensive_samples(data, idx, src, small_defended())
    src_x, src_y = ((data.x_train_clean, data.y_train_true) if source == "clean_original" else (data.x_train, data.y_train))
    assert torch.equal(y_def, (src_y[idx] + 1) % 10)
    assert x_def.dtype == torch.float32 and (x_def[:, :, :3, :3] == 2.0).all()
    assert torch.equal(x_def[:, :, 3:, 3:], src_x[idx][:, :, 3:, 3:].float() / 255)
    picked_poisoned = data.poison_indicator[idx] == 1
    assert picked_poisoned.sum() > 100   # the target class's pool contains the poisoned samples
    if source == "clean_original":       # ... whose clean originals come with their true labels
        assert (y_def[picked_poisoned] != 1).any()
    else:
        assert (y_def[picked_poisoned] == 1).all()
    batches = pdb.epoch_batches(len(data.y_train), len(idx), 5, 256, torch.Generator().manual_seed(0))
    assert len(data.y_train) + 5 * len(idx) == 75000
    assert len(batches) == 292 and all(len(b) == 256 for b in batches)
    assert int(torch.cat(batches).max()) < 75000


def test_reserve_case_draws_only_reserve_indices():
    data, _ = fake_cifar_data(reserve=600)
    idx, src = pdb.select_defensive(data, 0.1, "poisoned", seed=0)
    assert src == "reserve" and len(idx) == 5000
    assert set(idx.tolist()) <= set(data.reserve_indices.tolist())
    _, y_def = pdb.defensive_samples(data, idx, src, small_defended())
    assert torch.equal(y_def, (data.y_train_true[idx] + 1) % 10)
    short, _ = fake_cifar_data(reserve=300)
    with pytest.raises(UserError, match="300 samples available but 500"):
        pdb.select_defensive(short, 0.1, "clean_original", seed=0)


# --- augmentation ----------------------------------------------------------------------------------------

AUG = dict(scale_prob=0.2, scale_range=[0.5, 1.0], noise_prob=0.5, aug=0.0, rotate_prob=0.5, rotate_degrees=10.0,
           crop_padding=4, flip_prob=0.5)
OFF = dict(AUG, scale_prob=0.0, noise_prob=0.0, rotate_prob=0.0, crop_padding=0, flip_prob=0.0)


def stamped_batch(n=64):
    torch.manual_seed(2)
    return DefendedModel(cnn(), (1, 28, 28)).stamp(torch.rand(n, 1, 28, 28))


def test_noise_at_aug_0_is_a_noop_and_scale_keeps_the_trigger_in_1_2():
    x = stamped_batch()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(pdb.augment_defensive(x, g, dict(OFF, noise_prob=1.0)), x)
    noisy = pdb.augment_defensive(x, g, dict(OFF, noise_prob=1.0, aug=0.1))
    assert not torch.equal(noisy, x)
    s = pdb.augment_defensive(x, g, dict(OFF, scale_prob=1.0))
    trig = s[:, :, :7, :7]
    assert trig.min() >= 1.0 and trig.max() <= 2.0 and (trig < 1.9).any()
    assert torch.allclose(s / x.clamp_min(1e-6), (s / x.clamp_min(1e-6))[:, :1, :1, :1].expand_as(s), atol=1e-4)


def test_full_augmentation_never_clamps():
    x = stamped_batch(256)
    out = pdb.augment_defensive(x, torch.Generator().manual_seed(0), AUG)
    assert out.shape == x.shape and out.max() > 1.0
    # the trigger moves (crop, flip, rotation) but survives in most samples
    assert ((out > 1.0).flatten(1).sum(1) > 20).float().mean() > 0.8


def test_rotation_is_a_rotation_with_zero_fill():
    x = torch.rand(3, 2, 28, 28) + 0.5
    assert torch.equal(augment.random_rotation(x, torch.Generator().manual_seed(0), 1.0, 0.0), x)      # angle 0: identity
    quarter = torch.full((3,), torch.pi / 2)
    assert torch.equal(augment.rotate_by(x, quarter), torch.rot90(x, 1, (2, 3)))              # counter-clockwise
    r = augment.rotate_by(x, torch.full((3,), torch.pi / 4))
    assert (r[:, :, 0, 0] == 0).all() and (r[:, :, 14, 14] > 0).all()                     # corners zero-filled
    assert set(r.unique().tolist()) <= set(x.unique().tolist()) | {0.0}                   # nearest: no new values
    g = torch.Generator().manual_seed(0)
    some = augment.random_rotation(x.repeat(20, 1, 1, 1), g, 0.5, 10.0)
    changed = (some != x.repeat(20, 1, 1, 1)).flatten(1).any(1).float().mean()
    assert 0.25 < changed < 0.75


# --- the run and its record ------------------------------------------------------------------------------

def run_pdb(record, *extra):
    return pdb.main(["--result_file", str(record), "--epochs", "1", "--cos_t_max", "1", "--batch_size", "64", *extra])


def test_record_round_trip_and_refusals(tiny_record, tmp_path):
    rec = tmp_path / "rec"
    shutil.copytree(tiny_record, rec)
    s = run_pdb(rec)
    out = rec / "defense" / "pdb"
    for f in ("config.yaml", "model.pt", "metrics.csv", "summary.json", "curves.png", "log.txt", "index.txt"):
        assert (out / f).exists(), f
    assert not (out / "checkpoint.pt").exists()
    for k in ("test_acc", "test_asr", "test_ra", "raw_test_acc", "raw_test_asr", "raw_test_ra", "attack_test_asr", "der"):
        assert k in s
    assert s["der"] == pytest.approx((max(0, s["attack_test_asr"] - s["test_asr"])
                                      - max(0, s["attack_test_acc"] - s["test_acc"]) + 1) / 2)
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:11] == ["epoch", "lr", "seconds", "train_loss", "train_loss_ordinary", "train_loss_defensive",
                           "train_acc_ordinary", "train_acc_defensive", "test_acc", "test_asr", "test_ra"]
    meta = yaml.safe_load((out / "config.yaml").read_text())
    assert meta["defensive_set"]["source"] == "clean_original" and meta["config"]["pix_value"] == 2.0
    per_class = int(600 * meta["config"]["ratio"] // 10)      # 600 fake training images, 10 classes
    assert len((out / "index.txt").read_text().split()) == meta["defensive_set"]["size"] == 10 * per_class

    raw = torch.load(out / "model.pt", weights_only=True)
    assert "state_dict" not in raw and "model" not in raw and "inner_state_dict" in raw and raw["defense"] == "pdb"
    with pytest.raises(UserError, match="load_defense_model"):
        load_model_file(out / "model.pt")
    model = load_defense_model(out / "model.pt")
    assert isinstance(model, DefendedModel) and model.settings() == dict(
        trigger_type=1, pix_value=2.0, square_size=7, border_width=1, target_type=1)
    # the loaded model reproduces the figures the run computed with its in-memory model
    data = load_attack_record(str(rec)).data
    figs = evaluate_backdoor(model, EvalSets(data, "cpu"), Precision(torch.device("cpu"), True, True))
    assert (figs["test_acc"], figs["test_asr"], figs["test_ra"]) == (s["test_acc"], s["test_asr"], s["test_ra"])
    # and equals a DefendedModel rebuilt in memory from the same weights
    inner = build_model("cnn", 10, 1, (0.5,), (0.5,))
    inner.load_state_dict(raw["inner_state_dict"])
    mem = DefendedModel(inner.eval(), (1, 28, 28))
    x = data.x_test[:50].float() / 255
    with torch.no_grad():
        assert torch.equal(model(x).argmax(1), mem(x).argmax(1))

    with pytest.raises(UserError, match="--overwrite"):
        run_pdb(rec)
    with pytest.raises(UserError, match="noise_prob"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("lmd_1: 1.0\n")
        run_pdb(rec, "--yaml_path", str(bad), "--overwrite")
    with pytest.raises(UserError, match="multiple of K"):
        run_pdb(rec, "--target_type", "10", "--overwrite")
    assert (out / "summary.json").exists()   # refused settings did not touch the record


@pytest.mark.device
def test_resume_equals_an_uninterrupted_run(tiny_record, tmp_path, monkeypatch, run_device):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_record, a)
    shutil.copytree(tiny_record, b)
    args = ["--epochs", "2", "--cos_t_max", "2", "--ratio", "0.2", "--device", run_device]
    run_pdb(a, *args)
    real_evaluate, calls = pdb.evaluate, []

    def dies_in_epoch_2(ctx, defended):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(ctx, defended)
    monkeypatch.setattr(pdb, "evaluate", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_pdb(b, *args)
    monkeypatch.setattr(pdb, "evaluate", real_evaluate)
    assert (b / "defense/pdb/checkpoint.pt").exists() and not (b / "defense/pdb/summary.json").exists()
    with pytest.raises(UserError, match="--resume"):
        run_pdb(b, *args)
    run_pdb(b, *args, "--resume")
    wa = torch.load(a / "defense/pdb/model.pt", weights_only=True)["inner_state_dict"]
    wb = torch.load(b / "defense/pdb/model.pt", weights_only=True)["inner_state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_missing_or_incomplete_record_is_refused(tiny_record, tmp_path):
    with pytest.raises(UserError, match="no attack record"):
        run_pdb(tmp_path / "nothing")
    rec = tmp_path / "partial"
    shutil.copytree(tiny_record, rec)
    (rec / "summary.json").unlink()
    with pytest.raises(UserError, match="incomplete"):
        run_pdb(rec)


def test_short_real_run_lowers_asr(real_badnet_record, tmp_path):
    rec = tmp_path / "real"
    shutil.copytree(real_badnet_record, rec)
    s = pdb.main(["--result_file", str(rec), "--epochs", "4", "--cos_t_max", "4", "--batch_size", "64"])
    assert s["attack_test_asr"] > 0.9
    assert s["test_asr"] < 0.1, s        # the defended model ignores the attacker's patch
    assert s["test_acc"] > 0.65, s       # and still classifies (4 short epochs on 6,000 images)
    assert s["der"] > 0.85, s
