"""FT-SAM (ftsam.md §9): the SAM step against the quadratic toy's hand computation (adaptive and plain), momentum
and weight decay on g', the decomposition, the smoothed KL, the lr and rho schedules, the weights restored and the BN
statistics kept in the perturbed pass, options, the balanced subset, the record and resume without test leak."""
import copy
import csv
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defense.ftsam as ftsam
from models import build_model
from tests.conftest import synthetic_images
from utils.engine.device import Precision
from utils.engine.optim import make_scheduler
from utils.errors import UserError

DEFAULTS = {o.name: o.default for o in ftsam.OPTIONS}
FP32 = Precision(torch.device("cpu"), amp=False, channels_last=False)


def cfg(**kw):
    return {**DEFAULTS, **kw}


def toy_step(adaptive, momentum=0.0, wd=0.0, rho=0.5):
    """L(w) = 1/2 sum a_k w_k^2 at w = (1, -2), a = (1, 0.5): g = (1, -1)."""
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    a = torch.tensor([1.0, 0.5], dtype=torch.float64)
    opt = torch.optim.SGD([w], lr=0.1, momentum=momentum, weight_decay=wd)
    l1, l2, _, gn, en = ftsam.sam_iteration([w], lambda: (0.5 * (a * w * w).sum(), None), opt, rho,
                                            cfg(adaptive=adaptive))
    return w.detach(), l1.item(), l2.item(), gn.item(), en.item(), opt


# --- the SAM step ---------------------------------------------------------------------------------------------

def test_adaptive_sam_step_on_the_quadratic_toy():
    w, l1, l2, gn, en, _ = toy_step(True)
    assert torch.allclose(w, torch.tensor([0.877639, -1.855279], dtype=torch.float64), atol=1e-6)
    e = torch.tensor([1.0, -4.0], dtype=torch.float64) * 0.5 / math.sqrt(5)       # (0.223607, -0.894427)
    w2 = torch.tensor([1.0, -2.0], dtype=torch.float64) + e                        # (1.223607, -2.894427)
    assert l1 == pytest.approx(0.5 * (1 + 0.5 * 4)) and gn == pytest.approx(math.sqrt(2))
    assert l2 == pytest.approx(0.5 * (w2[0] ** 2 + 0.5 * w2[1] ** 2).item()) and en == pytest.approx(e.norm().item())
    # ||e / |w| || = rho: the adaptive radius
    assert (e / torch.tensor([1.0, 2.0], dtype=torch.float64)).norm().item() == pytest.approx(0.5)


def test_plain_sam_step_on_the_quadratic_toy():
    w, *_ = toy_step(False)
    assert torch.allclose(w, torch.tensor([0.864645, -1.882322], dtype=torch.float64), atol=1e-6)


def test_momentum_and_weight_decay_see_only_the_perturbed_gradient():
    w, *_, opt = toy_step(True, momentum=0.9, wd=5e-4)
    w0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g2 = torch.tensor([1.223607, -1.447214], dtype=torch.float64)
    expect = w0 - 0.1 * (g2 + 5e-4 * w0)            # the first step: buffer = gradient, decay at the restored w
    assert torch.allclose(w, expect, atol=1e-6)
    buf = next(iter(opt.state.values()))["momentum_buffer"]
    assert torch.allclose(buf, g2 + 5e-4 * w0, atol=1e-6)


def test_decomposition():
    g, g2 = [torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])]
    assert torch.allclose(ftsam.decompose(g, g2, 1.0, 1e-12)[0], torch.tensor([0.5, 1.5]), atol=1e-6)
    assert ftsam.decompose(g, g2, 0.0, 1e-12)[0] is g2[0]
    # through an iteration: alpha enters the step
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    a = torch.tensor([1.0, 0.5], dtype=torch.float64)
    ftsam.sam_iteration([w], lambda: (0.5 * (a * w * w).sum(), None), torch.optim.SGD([w], lr=0.1), 0.5,
                        cfg(alpha=0.5))
    assert not torch.allclose(w.detach(), torch.tensor([0.877639, -1.855279], dtype=torch.float64), atol=1e-4)


def test_zero_weights_are_never_moved_by_the_adaptive_perturbation():
    e, _ = ftsam.sam_perturbation([torch.tensor([0.0, 2.0])], [torch.tensor([3.0, 1.0])], 1.0, True, 1e-12)
    assert e[0][0].item() == 0.0 and e[0][1].item() == pytest.approx(2.0)


# --- the loss, the schedules ------------------------------------------------------------------------------------

def test_smoothed_kl():
    got = ftsam.smoothed_kl(torch.zeros(1, 3), torch.tensor([0]), 0.1).item()
    assert got == pytest.approx(0.9 * math.log(0.9) + 0.1 * math.log(0.05) + math.log(3), abs=1e-6)
    assert got == pytest.approx(0.7042146, abs=1e-6)
    z, y = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), torch.arange(6)
    assert torch.allclose(ftsam.smoothed_kl(z, y, 0.0), F.cross_entropy(z, y), atol=1e-6)
    # the gradient is the smoothed cross-entropy's (the entropy of q is a constant)
    z.requires_grad_(True)
    g1, = torch.autograd.grad(ftsam.smoothed_kl(z, y, 0.2), z)
    q = torch.full((6, 10), 0.2 / 9).scatter_(1, y[:, None], 0.8)
    g2, = torch.autograd.grad(-(q * z.log_softmax(1)).sum(1).mean(), z)
    assert torch.allclose(g1, g2, atol=1e-7)


def test_schedules():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = make_scheduler(opt, cfg())
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ftsam.scheduler_step(sched)
    assert lrs[0] == 0.01 and lrs[50] == pytest.approx(0.005) and lrs[100] == pytest.approx(0, abs=1e-12)
    assert lrs[200] == pytest.approx(0.01) and lrs[999] == pytest.approx(0.0099975, abs=1e-7)
    assert ftsam.rho_at(lrs[50], 0.01, 2.0, 2.0) == 2.0 and ftsam.rho_at(lrs[50], 0.01, 2.0, 1.0) == pytest.approx(1.5)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    plateau = make_scheduler(opt, cfg(lr_scheduler="ReduceLROnPlateau", plateau_patience=0))
    ftsam.scheduler_step(plateau, 1.0)
    assert opt.param_groups[0]["lr"] == 0.01
    ftsam.scheduler_step(plateau, 2.0)           # no improvement, patience 0: the lr is cut by the factor 0.1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001) and plateau.best == 1.0
    with pytest.raises(UserError, match="--sched_step epoch"):
        ftsam.check_schedule(cfg(lr_scheduler="ReduceLROnPlateau"))


# --- restore and BN statistics, a whole epoch --------------------------------------------------------------------

def cnn(seed=0, width=4):
    torch.manual_seed(seed)
    return build_model("cnn", 10, 1, (0.3,), (0.4,), width)


def test_restore_is_exact_and_the_perturbed_pass_keeps_bn_statistics():
    model = cnn().train()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref(x)                                    # one train-mode forward at w
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.0)
    ftsam.sam_iteration(params, lambda: (ftsam.smoothed_kl(model(x), y, 0.1), None), opt, 2.0, cfg(), model)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    s, r = model.state_dict(), ref.state_dict()
    stats = [k for k in s if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(s[k], r[k]) for k in stats)
    counts = [k for k in s if k.endswith("num_batches_tracked")]
    assert all(s[k].item() == r[k].item() + 1 for k in counts)        # both passes counted, as in the original
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_an_epoch_moves_the_weights_and_steps_per_iteration():
    model = cnn(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.arange(40) % 10
    c = cfg(batch_size=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = make_scheduler(opt, c)
    counter = ftsam.Counter()
    row = ftsam.ftsam_epoch(model, x, y, opt, sched, c, FP32, torch.Generator().manual_seed(1), lambda b: b, counter)
    assert counter.t == 3 and sched.last_epoch == 3 and row["lr"] == 0.01
    assert row["lr_last"] == pytest.approx(0.005 * (1 + math.cos(math.pi * 2 / 100)))
    assert row["rho"] == 2.0 and row["train_loss_sam"] > 0 and 0 <= row["train_acc"] <= 1
    norms = ftsam.neuron_norms(model)
    assert ("layers.5.0", 15) in norms and ("head", 9) in norms and len(norms) == 16 + 10


# --- the script ---------------------------------------------------------------------------------------------------

def copy_record(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("defense"))
    return dst


def rows_of(path):
    with open(path / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


EXTRA = ["--epochs", "4", "--ratio", "0.2", "--batch_size", "32", "--cos_t_max", "5", "--device", "{device}",
         "--amp", "false", "--channels_last", "false"]


def test_options(tiny_record, tmp_path):
    for flag in ("--rho", "--checkpoint_path"):
        with pytest.raises(UserError, match="unknown option"):
            ftsam.configure(["--result_file", str(tiny_record), flag, "1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rho: 2.0\n")
    with pytest.raises(UserError, match="unknown key 'rho'.*rho_max, rho_min"):
        ftsam.configure(["--result_file", str(tiny_record), "--yaml_path", str(bad)])
    c, args = ftsam.configure(["--result_file", str(tiny_record)])
    assert c["epochs"] == 25 and c["crop_padding"] == 1 and c["adaptive"] is True and c["balanced"] is True
    assert args.deviations == ["epochs = 25 (spec: 100)"]
    c, _ = ftsam.configure(["--result_file", str(tiny_record), "--adaptive", "false"])
    assert c["adaptive"] is False


@pytest.mark.device
def test_record_and_resume_without_test_leak(tiny_record, tmp_path, monkeypatch, run_device):
    extra = [v.format(device=run_device) for v in EXTRA]
    a = copy_record(tiny_record, tmp_path / "a")
    s = ftsam.main(["--result_file", str(a), *extra])
    out = a / "defense" / "ft-sam"
    for f in ("config.yaml", "model.pt", "metrics.csv", "summary.json", "curves.png", "index.txt", "neuron_norms.csv"):
        assert (out / f).exists(), f
    assert json.loads((out / "summary.json").read_text()) == s and s["iterations"] == 4 * 4
    for k in ("test_acc", "test_asr", "test_ra", "attack_test_asr", "der", "rir", "last_stage_rel_norm_change"):
        assert k in s, k
    idx = [int(v) for v in (out / "index.txt").read_text().split()]
    poisoned = set(json.loads((a / "poison.json").read_text())["poison_indices"])
    assert len(idx) == 120 and poisoned and not set(idx) & poisoned
    _, y_train = synthetic_images(600, 0)                     # the fixture's training labels
    assert torch.bincount(torch.as_tensor(y_train[idx]).long(), minlength=10).tolist() == [12] * 10   # balanced
    rows = rows_of(out)
    for k in ("lr", "lr_last", "rho", "train_loss", "train_loss_sam", "train_acc", "grad_norm", "perturb_norm",
              "weight_norm", "clean_test_loss", "bd_test_loss", "ra_test_loss", "test_acc"):
        assert k in rows[0], k
    assert float(rows[1]["lr"]) == pytest.approx(0.005 * (1 + math.cos(math.pi * 4 / 5)))   # per-iteration cosine
    norms = list(csv.DictReader(open(out / "neuron_norms.csv")))
    assert len(norms) == 32 + 10 and any(r["norm_before"] != r["norm_after"] for r in norms)

    # interrupted after the checkpoint of epoch 2 (the first session evaluating on other test sets), resumed: the
    # uninterrupted run bit for bit, the lr and rho of every iteration included
    from utils.run_folder import Run
    original, real_open = Run.save_checkpoint, ftsam.open_defense

    def die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        if epoch == 2:
            raise KeyboardInterrupt

    def scrambled(*args, **kw):
        ctx = real_open(*args, **kw)
        g = torch.Generator().manual_seed(9)
        for name in ("x_test", "x_bd"):
            t = getattr(ctx.eval_sets, name)
            setattr(ctx.eval_sets, name, torch.randint(0, 256, t.shape, dtype=t.dtype, generator=g).to(t.device))
        return ctx
    b = copy_record(tiny_record, tmp_path / "b")
    monkeypatch.setattr(Run, "save_checkpoint", die)
    monkeypatch.setattr(ftsam, "open_defense", scrambled)
    with pytest.raises(KeyboardInterrupt):
        ftsam.main(["--result_file", str(b), *extra])
    monkeypatch.setattr(Run, "save_checkpoint", original)
    monkeypatch.setattr(ftsam, "open_defense", real_open)
    ftsam.main(["--result_file", str(b), *extra, "--resume"])
    ob = b / "defense" / "ft-sam"
    wa = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(ob / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = rows_of(out), rows_of(ob)
    test_keys = [k for k in ra[0] if "test" in k or k.startswith("bd_")]   # what the evaluation writes
    assert ra[2:] == rb[2:] and [r[k] for r in ra[:2] for k in test_keys] != [r[k] for r in rb[:2] for k in test_keys]
    assert [{k: v for k, v in r.items() if k not in test_keys} for r in ra] == \
           [{k: v for k, v in r.items() if k not in test_keys} for r in rb]
    assert (out / "neuron_norms.csv").read_text() == (ob / "neuron_norms.csv").read_text()
