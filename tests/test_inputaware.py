"""Input-Aware Dynamic Backdoor (attack/inputaware.py, docs/specs/inputaware.md §9): the blend and its threshold,
distances and losses on hand values, the generators, gradient routing, the canonical application, the record
rebuilt from itself alone, the cross partners, and resume in either phase. Tiny: generators of width 4 on the
fake 28 x 28 data."""
import copy
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attack.inputaware as ia
from tests.conftest import REPO, killed_after_checkpoint, make_record
from utils.errors import UserError
from utils.record import load_attack_record, record_trigger
from utils.seeding import generator

TINY = ["--gen_channels", "4", "--gen_steps", "2", "--amp", "false", "--channels_last", "true"]   # no probe
CFG = {"mask_density": 0.032, "lambda_div": 1.0, "lambda_norm": 100.0, "EPSILON": 1e-7, "attack_label_trans": "all2one",
       "attack_target": 0, "attack_label_shift_amount": 1, "g_grad_accumulation": True}


def run(path, root, extra=()):
    """2 mask epochs, 2 classifier epochs, a clean reserve of 10 %; batches of 128 (5 an epoch: the time of a
    run is mostly per-iteration overhead at this size)."""
    return make_record(path, root, "inputaware", extra=[*TINY, "--clean_train_epochs", "2", "--epochs", "4",
                                                         "--reserve_ratio", "0.1", "--batch_size", "128", *extra])


def nets(seed=0, width=4, steps=2):
    torch.manual_seed(seed)
    return ia.Generator(1, 1, width, steps, [0.3], [0.4]), ia.Generator(1, 1, width, steps, [0.3], [0.4])


@pytest.fixture(scope="module")
def record(tmp_path_factory, fake_root):
    path = tmp_path_factory.mktemp("ia") / "ia"
    return path, run(path, fake_root)


# --- formulas on hand values ------------------------------------------------------------------------------------

def test_the_blend_and_the_threshold_on_hand_values():
    assert ia.threshold(torch.tensor(0.5)).item() == 0.5
    x = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]])
    m = torch.tensor([[[[0.0, 1.0], [0.5, 0.0]]]])
    assert torch.allclose(ia.blend(x, torch.full_like(x, 0.25), m), torch.tensor([[[[0.0, 0.25], [0.375, 0.5]]]]))
    # fp32 saturates to exactly 0 and 1, float64 keeps eps0 (spec §6)
    assert ia.squash(torch.tensor(30.0)).item() == 1.0 and ia.squash(torch.tensor(30.0, dtype=torch.float64)) < 1
    v = torch.tensor([-0.1, 0.25, 0.5, 1.2], dtype=torch.float64)   # 255 v: -25.5, 63.75, 127.5, 306
    assert ia.quantize(v, "round").tolist() == [0, 64, 128, 255]     # 127.5: half to even
    assert ia.quantize(v, "trunc").tolist() == [0, 63, 127, 255]


def test_distances_and_losses_on_hand_values():
    a = torch.full((2, 1, 2, 2), 0.3)
    std = torch.tensor(0.5).view(1, 1, 1, 1)
    assert torch.allclose(ia.distance(a, a - 0.1, std), torch.tensor([0.2, 0.2]))
    assert torch.allclose(ia.mask_distance(a, a - 0.1), torch.tensor([0.1, 0.1]))
    assert ia.diversity(torch.tensor([0.2]), torch.tensor([0.1]), 3.0, 0.0).item() == pytest.approx(6.0)
    assert ia.mask_norm(torch.tensor([0.032, 0.132]), 0.032).item() == pytest.approx(0.05)
    # M's loss weighs its diversity term by lambda_div twice (spec §7 #5): lambda_div 2 makes that term 4 times
    _, M = nets()
    x1, x2 = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.rand(8, 1, 16, 16)
    terms = []
    for lam in (1.0, 2.0):
        m = copy.deepcopy(M)
        loss, norm, div, _ = ia.mask_step(m, torch.optim.Adam(m.parameters(), lr=0.0), x1, x2, m.std,
                                          {**CFG, "lambda_div": lam}).tolist()
        terms.append(loss - 100.0 * norm)
        assert loss == pytest.approx(100.0 * norm + lam * div, rel=1e-5)
    assert terms[1] == pytest.approx(4 * terms[0], rel=1e-5)


def test_the_per_batch_counts():
    rule = ia.per_batch_rule({"pratio": 0.1, "epochs": 3, "clean_train_epochs": 1})
    g = torch.Generator().manual_seed(0)
    assert rule.counts(128, g) == (12, 12) and rule.counts(80, g) == (8, 8) and rule.epochs == 2
    low = ia.per_batch_rule({"pratio": 0.005, "epochs": 3, "clean_train_epochs": 1})   # Bernoulli(0.64)
    draws = [[low.counts(128, g)[0] for _ in range(40)] for g in (low.generator(7), low.generator(7))]
    assert draws[0] == draws[1] and set(draws[0]) == {0, 1}


# --- the generators -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,width,steps,c", [(28, 8, 2, 1), (32, 32, 3, 3), (64, 32, 3, 3)])
def test_generator_shapes(size, width, steps, c):
    for out in (c, 1):
        g = ia.Generator(c, out, width, steps).eval()
        with torch.no_grad():
            assert g(torch.rand(2, c, size, size)).shape == (2, out, size, size)
        bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(b.momentum == 0.05 and b.eps == 1e-5 for b in bns)
        assert isinstance(g.net[-1], nn.BatchNorm2d)   # the last block: no ReLU
    widths = [(m.in_channels, m.out_channels) for m in ia.Generator(1, 1, 8, 2).modules() if isinstance(m, nn.Conv2d)]
    assert widths == [(1, 8), (8, 8), (8, 16), (16, 16), (16, 16), (16, 16), (16, 8), (8, 8), (8, 1)]


def test_bad_settings_are_refused(fake_root, tmp_path):
    base = ["--dataset_path", str(fake_root), "--save_folder_name", str(tmp_path / "x")]
    with pytest.raises(UserError, match="gen_steps 3 .* 28x28 allows gen_steps up to 2"):
        ia.configure([*base, "--gen_steps", "3"])
    with pytest.raises(UserError, match="leaves no classifier epoch"):
        ia.configure([*base, "--clean_train_epochs", "3", "--epochs", "3"])
    with pytest.raises(UserError, match="at most 0.5"):
        ia.configure([*base, "--pratio", "0.6"])
    with pytest.raises(UserError, match="p_num does not apply"):
        ia.main([*base, *TINY, "--p_num", "5"])
    cfg = ia.configure(base)[0]
    assert (cfg["gen_channels"], cfg["gen_steps"], cfg["lr_scheduler"], cfg["drop_last"]) == \
        (4, 2, "MultiStepLR", False)


# --- phase 2: layout and gradient routing ---------------------------------------------------------------------

def iteration(C, optC, step, x1, x2, y, n):
    """What per_batch_epoch does with one batch; returns G's gradients just before G's step."""
    step.div_sum = torch.zeros((), dtype=torch.float64)
    x, yb = step.rows(x1, x2, y, n)
    loss = F.cross_entropy(C(x), yb) + step.loss()
    optC.zero_grad(set_to_none=True)
    loss.backward()
    optC.step()
    grads = [p.grad.clone() if p.grad is not None else None for p in step.G.parameters()]
    step.step()
    return grads


def phase2(accumulate):
    G, M = nets()
    M.eval().requires_grad_(False)
    torch.manual_seed(1)
    C = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    opt_G = torch.optim.Adam(G.parameters(), lr=0.01, betas=(0.5, 0.9))
    return C, torch.optim.SGD(C.parameters(), lr=0.1), ia.AttackBatch(G, M, opt_G, {**CFG, "g_grad_accumulation":
                                                                                   accumulate}, 10)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(10, 1, 16, 16, generator=g), torch.rand(10, 1, 16, 16, generator=g),
            torch.randint(1, 10, (10,), generator=g))


def test_the_batch_layout_and_an_empty_poisoned_part():
    C, _, step = phase2(True)
    x1, x2, y = batch(0)
    G = copy.deepcopy(step.G)   # in train mode: each call normalises with its own batch's statistics
    with torch.no_grad():
        p1, m1 = ia.pattern_and_mask(G, step.M, x1[:3])
        p2, m2 = ia.pattern_and_mask(G, step.M, x2[3:6])
    before = step.G.net[1].num_batches_tracked.item()
    x, yb = step.rows(x1, x2, y, 3)
    assert step.G.net[1].num_batches_tracked.item() == before + 2     # G ran twice
    assert torch.allclose(x[:3], ia.blend(x1[:3], p1, m1)) and torch.allclose(x[3:6], ia.blend(x1[3:6], p2, m2))
    assert torch.equal(x[6:], x1[6:]) and (yb[:3] == 0).all() and torch.equal(yb[3:], y[3:])
    assert not torch.equal(x[:3], x1[:3]) and not torch.equal(x[3:6], x1[3:6])
    x, yb = step.rows(x1, x2, y, 0)
    assert torch.equal(x, x1) and torch.equal(yb, y) and step.div.item() == 0.0


def test_gradient_routing_and_accumulation():
    runs = {}
    for accumulate in (True, False):
        C, optC, step = phase2(accumulate)
        m_before = copy.deepcopy(step.M.state_dict())
        runs[accumulate] = [iteration(C, optC, step, *batch(s), 3) for s in (0, 1)]
        assert all(torch.equal(v, step.M.state_dict()[k]) for k, v in m_before.items())   # M never changes
        assert all((p.grad is not None) == accumulate for p in step.G.parameters())
    (a1, a2), (b1, b2) = runs[True], runs[False]
    assert all(torch.equal(u, v) for u, v in zip(a1, b1))
    assert all(torch.allclose(s, u + v, rtol=0, atol=1e-7) for s, u, v in zip(a2, a1, b2))   # the sum of both


def test_the_mask_step_updates_bn_three_times():
    _, M = nets()
    opt = torch.optim.Adam(M.parameters(), lr=0.01, betas=(0.5, 0.9))
    ia.mask_step(M, opt, torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16), M.std, CFG)
    assert M.net[1].num_batches_tracked.item() == 3


# --- the canonical application --------------------------------------------------------------------------------

def images(n=10, seed=0):
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_canonical_application_is_independent_of_chunks_and_companions():
    G, M = nets()
    for g in (G, M):   # some training, so that BN's running statistics are not the initial ones
        g.train()(torch.rand(16, 1, 16, 16))
    x = images()
    out = [ia.InputAwareTrigger(G, M, chunk=c).apply(x) for c in (1, 3, 256)]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert torch.equal(ia.InputAwareTrigger(G, M).apply(x[5:6]), out[0][5:6])
    # an independent float64 reference written from spec §4
    G64, M64 = copy.deepcopy(G).double().eval(), copy.deepcopy(M).double().eval()
    u = x.double() / 255
    with torch.no_grad():
        p = 0.5 + torch.tanh(G64.net((u - 0.3) / 0.4)) / (2 + 1e-7)
        m = 0.5 + torch.tanh(20 * (0.5 + torch.tanh(M64.net((u - 0.3) / 0.4)) / (2 + 1e-7)) - 10) / (2 + 1e-7)
    assert torch.equal(out[0], torch.round(255 * ((1 - m) * u + m * p).clamp(0, 1)).to(torch.uint8))


def test_untouched_pixels_come_back_unchanged_under_round():
    G, M = nets()
    nn.init.constant_(M.net[-1].bias, -100.0)   # m0 = 0, so m = tau(0) ~ 2e-9 everywhere
    x = images()
    assert torch.equal(ia.InputAwareTrigger(G, M.eval(), "round").apply(x), x)
    trunc = ia.InputAwareTrigger(G, M, "trunc").apply(x)
    assert (trunc <= x).all() and (trunc < x).any()   # truncation drops a level wherever P < x


def test_cross_partners():
    every = torch.arange(50)
    p, whole = ia.partners(every, every, torch.Generator().manual_seed(3))
    assert whole and torch.equal(p.sort().values, every) and not (p == every).any()   # a derangement
    assert torch.equal(p, ia.partners(every, every, torch.Generator().manual_seed(3))[0])
    idx, pool = torch.tensor([3, 9, 4, 40]), torch.arange(2, 45)
    q, whole = ia.partners(idx, pool, torch.Generator().manual_seed(0))
    assert not whole and not (q == idx).any() and ((q >= 2) & (q < 45)).all()
    many = ia.partners(torch.full((4000,), 10), pool, torch.Generator().manual_seed(0))[0]
    assert set(many.tolist()) == set(pool.tolist()) - {10}   # uniform over the pool without the sample


# --- the record --------------------------------------------------------------------------------------------------

def test_the_record_rebuilds_from_itself_in_a_fresh_process(record, tmp_path):
    path, summary = record
    poison = json.loads((path / "poison.json").read_text())
    trig = poison["trigger"]
    assert trig["kind"] == "inputaware" and not trig["provisional"] and summary["test_cross_acc"] is not None
    threads = 1 if torch.get_num_threads() > 1 else 2   # another thread count than the run's
    code = (f"import torch; torch.set_num_threads({threads}); from utils.record import load_attack_record; "
            f"r = load_attack_record({str(path)!r}); print('rebuilt', len(r.data.x_cross_test))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    assert out.returncode == 0 and "rebuilt 200" in out.stdout, out.stderr[-2000:]
    # a changed BN buffer, with the file's own digest updated, is caught by the digests of the rebuilt images
    from safetensors.torch import load, save
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    t = load((bad / "trigger.safetensors").read_bytes())
    t["G.net.1.running_mean"] = t["G.net.1.running_mean"] + 0.5
    blob = save(t)
    (bad / "trigger.safetensors").write_bytes(blob)
    import hashlib
    poison["trigger"]["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    (bad / "poison.json").write_text(json.dumps(poison))
    with pytest.raises(UserError, match="gave a different"):
        load_attack_record(bad)


def test_what_the_record_holds(record):
    path, summary = record
    rec = load_attack_record(path)
    d, poison = rec.data, rec.poison
    bd, cross = torch.tensor(poison["poison_indices"]), torch.tensor(poison["cross_indices"])
    reserve = set(poison["reserve_indices"])
    assert len(bd) == len(cross) > 0 and not set(bd.tolist()) & set(cross.tolist())
    assert not (set(bd.tolist()) | set(cross.tolist())) & reserve and d.altered()[cross].all()
    assert (d.y_train[bd] == 0).all() and torch.equal(d.y_train[cross], d.y_train_true[cross])
    # the test partners are the derangement drawn from the seed; training partners are never the sample itself
    every = torch.arange(200)
    tp = torch.tensor(poison["trigger"]["test_partners"])
    assert torch.equal(tp, ia.partners(every, every, generator(0, "trigger_cross_test"))[0]) and not (tp == every).any()
    assert not (torch.tensor(poison["trigger"]["cross_partners"]) == cross).any()
    # the stored sets are the final generators' (model.pt holds the same), and fp32 differs by one level at most
    trigger = record_trigger(path, poison)
    saved = torch.load(path / "model.pt", weights_only=True)
    for name, net in (("G", trigger.G), ("M", trigger.M)):
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in saved[f"generator_{name}_state_dict"].items())
    with torch.no_grad():
        x = d.x_test[tp].float() / 255
        p, m = ia.pattern_and_mask(trigger.G, trigger.M, x)
        fast = ia.quantize(ia.blend(d.x_test.float() / 255, p, m), "round")
    assert (fast.int() - d.x_cross_test.int()).abs().max() <= 1
    rows = pd.read_csv(path / "metrics.csv")
    mask, train = rows[rows.phase == "mask"], rows[rows.phase == "train"]
    assert mask.epoch.tolist() == [1, 2] and train.epoch.tolist() == [3, 4]
    assert mask[["lr_M", "mask_loss", "mask_norm", "mask_div", "mask_density_mean"]].notna().all().all()
    assert train[["lr_G", "loss_ce", "loss_div", "test_cross_acc", "effective_pratio", "mask_density_test",
                  "train_cross_acc_only"]].notna().all().all()
    assert (train.loss_ce + train.loss_div - train.train_loss).abs().max() < 1e-9
    assert "test_asr_during_training" in summary


# --- resume -------------------------------------------------------------------------------------------------------

def same_records(a, b):
    ma, mb = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    for key in ("state_dict", "generator_G_state_dict", "generator_M_state_dict"):
        assert all(torch.equal(ma[key][k], mb[key][k]) for k in ma[key]), key
    ra, rb = (pd.read_csv(p / "metrics.csv").drop(columns="seconds") for p in (a, b))
    pd.testing.assert_frame_equal(ra, rb)
    assert json.loads((a / "poison.json").read_text()) == json.loads((b / "poison.json").read_text())
    assert (a / "trigger.safetensors").read_bytes() == (b / "trigger.safetensors").read_bytes()


def test_resume_after_kills_in_both_phases_equals_an_uninterrupted_run(record, tmp_path, fake_root):
    """Killed after mask epoch 1, resumed, killed again after classifier epoch 1, resumed to the end."""
    with killed_after_checkpoint(lambda phase, epoch: phase == 0 and epoch == 1):
        run(tmp_path / "cut", fake_root)
    with killed_after_checkpoint(lambda phase, epoch: phase == 1 and epoch == 1):
        run(tmp_path / "cut", fake_root, extra=["--resume"])
    run(tmp_path / "cut", fake_root, extra=["--resume"])
    same_records(record[0], tmp_path / "cut")
