"""SAU (sau.md §10): shared PGD, the PGD and unlearning losses on hand-made inputs, the frozen reference,
eval-mode BatchNorm, constant lr, the record, resume, and a short real run that lowers ASR."""
import copy
import csv
import json
import math
import shutil

import pytest
import torch
from torch import nn

import defense.sau as sau
from models import build_model
from utils.config import CONFIG_DIR, read_yaml
from utils.errors import UserError
from utils.engine.device import Precision

FP32 = Precision(torch.device("cpu"), amp=False, channels_last=False)
DEFAULTS = {o.name: o.default for o in sau.OPTIONS}


def cfg(**kw):
    return {**DEFAULTS, **kw}


def cnn(seed, width=4):
    torch.manual_seed(seed)
    return build_model("cnn", 10, 1, (0.5,), (0.5,), width).eval()


def batch(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


class MeanThreshold(nn.Module):
    """Class 1 when the mean pixel exceeds `t`, else class 0 (smooth, so gradients reach the input)."""

    def __init__(self, t):
        super().__init__()
        self.t = t

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([self.t - m, m - self.t], 1) * 20


# --- shared PGD -------------------------------------------------------------------------------------------------

def test_pgd_perturbation_within_bound_and_on_the_sign_grid():
    model, ref = cnn(1), cnn(2).requires_grad_(False)
    x, y = batch()
    delta, steps = sau.shared_pgd(model, ref, x, y, cfg(), FP32)
    assert 1 <= steps <= 5
    assert delta.shape == x.shape and not delta.requires_grad
    grid = torch.tensor([-0.2, 0.0, 0.2])
    assert torch.isclose(delta[..., None], grid, atol=1e-7).any(-1).all()
    assert (delta.abs() < 1e-7).any() or (delta < 0).any()  # PGD actually moved some coordinates
    # another step size: still inside the L_inf ball
    delta, _ = sau.shared_pgd(model, ref, x, y, cfg(adv_lr=0.07), FP32)
    assert delta.abs().max() <= 0.2 + 1e-7
    assert not torch.isclose(delta[..., None], grid, atol=1e-7).any(-1).all()


def test_pgd_perturbed_images_are_not_clamped():
    # with no loss at all the gradient is zero and delta stays at its +epsilon start: x~ = 1.2 on white images
    x = torch.ones(4, 1, 28, 28)
    delta, steps = sau.shared_pgd(cnn(1), cnn(2).requires_grad_(False), x, torch.zeros(4, dtype=torch.long),
                                  cfg(beta_1=0.0, beta_2=0.0), FP32)
    assert steps == 5 and torch.allclose(x + delta, torch.full_like(x, 1.2))


def test_beta2_zero_means_the_shared_term_has_no_effect(monkeypatch):
    model, ref = cnn(1), cnn(2).requires_grad_(False)
    x, y = batch()
    with_zero_weight, s0 = sau.shared_pgd(model, ref, x, y, cfg(beta_2=0.0), FP32)
    with_weight, _ = sau.shared_pgd(model, ref, x, y, cfg(beta_2=1.0), FP32)
    monkeypatch.setattr(sau, "js_term", lambda logits, logits_r, shared: torch.zeros(()))
    removed, s1 = sau.shared_pgd(model, ref, x, y, cfg(beta_2=1.0), FP32)
    assert torch.equal(with_zero_weight, removed) and s0 == s1
    assert not torch.equal(with_weight, removed)  # the term does matter when weighted


def test_early_stop_after_one_update_when_every_sample_is_shared():
    x, y = torch.full((6, 1, 28, 28), 0.5), torch.zeros(6, dtype=torch.long)
    # clean mean 0.5 -> class 0; at the start delta = +0.2 the mean is 0.7 -> class 1 for both models: all shared
    model, ref = MeanThreshold(0.6), MeanThreshold(0.6)
    _, steps = sau.shared_pgd(model, ref, x, y, cfg(), FP32)
    assert steps == 1
    # a threshold the bound cannot reach: never shared, all 5 steps run
    _, steps = sau.shared_pgd(MeanThreshold(0.8), MeanThreshold(0.8), x, y, cfg(), FP32)
    assert steps == 5
    # one sample not shared: no early stop
    x[0] = 0.1
    _, steps = sau.shared_pgd(model, ref, x, y, cfg(), FP32)
    assert steps == 5


def test_shared_mask():
    pred0, pred0_r = torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 1])
    pred, pred_r = torch.tensor([1, 1, 0, 2]), torch.tensor([1, 2, 0, 2])
    assert sau.shared_mask(pred, pred_r, pred0, pred0_r).tolist() == [True, False, False, True]


# --- the PGD losses on hand-made logits ---------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
LOGITS_R = torch.tensor([[1.0, 1.0, 0.0], [2.0, -2.0, 0.5], [0.0, 0.0, 0.0], [4.0, 0.0, 1.0]])
Y = torch.tensor([0, 2, 1, 0])


def ce(row, k):
    return math.log(sum(math.exp(v) for v in row)) - row[k]


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_adversarial_term_formula():
    fooled = torch.tensor([False, True, False, True])
    fooled_r = torch.tensor([True, False, False, False])
    b = 4
    expect = -(sum(ce(LOGITS[i].tolist(), Y[i]) for i in range(b) if not fooled[i])
               + sum(ce(LOGITS_R[i].tolist(), Y[i]) for i in range(b) if not fooled_r[i])) / (2 * b)
    got = sau.adversarial_term(LOGITS, LOGITS_R, Y, fooled, fooled_r)
    assert got.item() == pytest.approx(expect, rel=1e-6)


def test_js_term_formula():
    shared = torch.tensor([False, True, False, False])
    logits = LOGITS.clone()
    logits[3] = torch.tensor([0.0, 0.0, 40.0])  # probabilities below 1e-8: the clamp applies
    expect = 0.0
    for i in range(4):
        if shared[i]:
            continue
        p = [max(v, 1e-8) for v in softmax(logits[i].tolist())]
        q = [max(v, 1e-8) for v in softmax(LOGITS_R[i].tolist())]
        m = [(a + c) / 2 for a, c in zip(p, q)]
        expect += 0.5 * sum(a * math.log(a / mm) + c * math.log(c / mm) for a, c, mm in zip(p, q, m))
    got = sau.js_term(logits, LOGITS_R, shared)
    assert got.item() == pytest.approx(expect / 4, rel=1e-5)
    assert sau.js_term(LOGITS, LOGITS, torch.zeros(4, dtype=torch.bool)).abs().item() < 1e-6  # identical models


# --- the unlearning loss and mask ----------------------------------------------------------------------------------

def test_potential_poison_mask_uses_true_labels_and_the_references_clean_prediction():
    y = torch.tensor([0, 1, 2, 3, 4])
    pred0_r = torch.tensor([0, 2, 2, 1, 1])
    pred_r = torch.tensor([1, 2, 2, 3, 1])
    # 0: away from y and from pred0_r; 1: equals pred0_r; 2: equals both; 3: equals y; 4: equals pred0_r
    assert sau.potential_poison_mask(y, pred0_r, pred_r).tolist() == [True, False, False, False, False]


def test_sar_loss_formula_counts_masked_out_samples_in_the_batch_size():
    logits = torch.tensor([[0.0, 3.0, 1.0], [9.0, -9.0, 0.0], [-9.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    pred_r = torch.tensor([1, 0, 0, 2, 0])
    mask = torch.tensor([True, True, True, False, False])  # sample 1: a > 0.999; sample 2: a < 0.001 (clips act)
    expect = 0.0
    for i in range(5):
        if mask[i]:
            p = softmax(logits[i].tolist())
            a = p[pred_r[i]]
            o = sum(v for k, v in enumerate(p) if k != pred_r[i])
            expect += 0.5 * (-math.log(1e-6 + min(o, 0.999)) - math.log(1 + 1e-6 - max(a, 0.001)))
    got = sau.sar_loss(logits, pred_r, mask)
    # B = 5, not |P| = 3; fp32 as specified: 1 + 1e-6 - a for a near 1 loses digits, hence rel 1e-4
    assert got.item() == pytest.approx(expect / 5, rel=1e-4)
    assert sau.sar_loss(logits, pred_r, torch.zeros(5, dtype=torch.bool)).item() == 0.0


class LabelReader(nn.Module):
    """A reference that reads the label from pixel (0, 0) and shifts it by one where pixel (0, 1) exceeds 0.5."""

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 10).round().long() + (x[:, 0, 0, 1] > 0.5).long()
        return torch.nn.functional.one_hot(label % 10, 10).float() * 10


class Oracle(LabelReader):
    """A purified model that is always right on the clean images (one trainable parameter, so Adam can step)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return super().forward(x.clone().index_fill_(3, torch.tensor([1]), 0.0)) + self.w


def test_unlearning_mask_does_not_depend_on_the_purified_model():
    x, y = batch(n=8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = y.float() / 10, 0.4      # the reference is right on every clean image
    delta = torch.zeros_like(x)
    delta[:4, 0, 0, 1] = 0.2                                   # ... and fooled on the first four perturbed ones
    fractions = []
    for model in (cnn(1), cnn(3), Oracle()):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
        fractions.append(sau.unlearning_step(model, LabelReader(), x, y, delta, cfg(), FP32, opt)["mask_fraction"])
    assert fractions == [0.5, 0.5, 0.5]   # P = the four fooled samples, whatever f_theta predicts


# --- the round: frozen reference, eval-mode BN, constant lr ---------------------------------------------------------

def test_round_keeps_reference_frozen_bn_statistics_fixed_and_lr_constant():
    base = cnn(0, width=8)
    model, ref = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, amsgrad=True)
    c = cfg(batch_size=16)
    rows = [sau.sau_round(model, ref, x, y, opt, c, FP32, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert all(r["lr"] == 1e-3 for r in rows) and opt.param_groups[0]["lr"] == 1e-3
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ref_before.items())
    assert not ref.training and all(p.grad is None for p in ref.parameters())
    after = model.state_dict()
    bn_stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    bn_affine = [k for k in after if k.endswith(("weight", "bias")) and k.replace("weight", "running_mean").replace(
        "bias", "running_mean") in after]
    assert bn_stats and bn_affine
    assert all(torch.equal(before[k], after[k]) for k in bn_stats)
    assert all(not torch.equal(before[k], after[k]) for k in bn_affine)
    assert rows[0]["pgd_steps_mean"] >= 1 and 0 <= rows[0]["shared_fraction"] <= 1
    # train_mode: BN statistics move
    sau.sau_round(model, ref, x, y, opt, cfg(batch_size=16, train_mode=True), FP32, torch.Generator().manual_seed(1))
    assert not all(torch.equal(before[k], model.state_dict()[k]) for k in bn_stats)


# --- the script: record, rules, resume -------------------------------------------------------------------------------

def copy_record(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("defense"))
    return dst


def read_rows(path):
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_record_files_and_rules(tiny_record, tmp_path):
    rec = copy_record(tiny_record, tmp_path / "rec")
    argv = ["--result_file", str(rec), "--n_rounds", "2", "--device", "cpu"]
    s = sau.main(argv)
    out = rec / "defense" / "sau"
    for f in ("config.yaml", "model.pt", "metrics.csv", "summary.json", "curves.png", "log.txt", "index.txt"):
        assert (out / f).exists(), f
    assert not (out / "checkpoint.pt").exists()
    summary = json.loads((out / "summary.json").read_text())
    for k in ("test_acc", "test_asr", "test_ra", "attack_test_acc", "attack_test_asr", "attack_test_ra", "der", "rir",
              "pgd_seconds", "pgd_share", "round_seconds"):
        assert k in summary, k
    assert summary == s
    assert len((out / "index.txt").read_text().split()) == math.floor(600 * 0.05)
    rows = read_rows(out)
    assert len(rows) == 2
    for k in ("epoch", "lr", "seconds", "train_loss", "train_loss_clean", "train_loss_sar", "mask_fraction",
              "shared_fraction", "pgd_steps_mean", "pgd_seconds", "clean_test_loss", "bd_test_loss", "ra_test_loss",
              "test_acc", "test_asr", "test_ra"):
        assert k in rows[0], k
    lr = read_yaml(CONFIG_DIR / "defense" / "sau" / "fashion_mnist.yaml")["lr"]
    assert float(rows[0]["lr"]) == float(rows[1]["lr"]) == lr  # constant
    config = (out / "config.yaml").read_text()
    assert "n_rounds = 2 (spec: 100)" in config
    with pytest.raises(UserError, match="already exists"):
        sau.main(argv)
    sau.main(argv + ["--overwrite"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 100\n")  # the original's unused key is not accepted
    with pytest.raises(UserError, match="unknown key 'epochs'"):
        sau.main(argv + ["--overwrite", "--yaml_path", str(bad)])


@pytest.mark.device
def test_resume_equals_an_uninterrupted_run(tiny_record, tmp_path, monkeypatch, run_device):
    extra = ["--n_rounds", "3", "--ratio", "0.2", "--batch_size", "32", "--lr", "1e-3", "--device", run_device]
    a = copy_record(tiny_record, tmp_path / "a")
    sau.main(["--result_file", str(a), *extra])
    b = copy_record(tiny_record, tmp_path / "b")
    real_round, calls = sau.sau_round, []

    def dying_round(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_round(*args)

    monkeypatch.setattr(sau, "sau_round", dying_round)
    with pytest.raises(KeyboardInterrupt):
        sau.main(["--result_file", str(b), *extra])
    assert (b / "defense" / "sau" / "checkpoint.pt").exists()
    monkeypatch.setattr(sau, "sau_round", real_round)
    with pytest.raises(UserError, match="--resume"):
        sau.main(["--result_file", str(b), *extra])
    sau.main(["--result_file", str(b), *extra, "--resume"])
    wa = torch.load(a / "defense/sau/model.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "defense/sau/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    drop = ("seconds", "pgd_seconds")
    ra, rb = read_rows(a / "defense/sau"), read_rows(b / "defense/sau")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rb]


# --- a short real run -----------------------------------------------------------------------------------------------

def test_short_real_run_lowers_asr(real_badnet_record):
    # 30 updates on a quarter of the 6,000-image subset: the fashion_mnist settings with lr 3e-3, since 30 updates at
    # their 1e-3 leave the small subset record's ASR above 0.9 (measured: 0.965; at 3e-3: 0.54)
    s = sau.main(["--result_file", str(real_badnet_record), "--n_rounds", "5", "--ratio", "0.25", "--lr", "3e-3",
                  "--device", "cpu", "--overwrite"])
    assert s["attack_test_asr"] > 0.9
    assert s["test_asr"] < s["attack_test_asr"] - 0.3, s
    assert s["test_acc"] > s["attack_test_acc"] - 0.15, s
