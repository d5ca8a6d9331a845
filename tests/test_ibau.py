"""i-BAU (ibau.md §9): the hypergradient against the scalar toy's hand computation and against explicit Jacobians on
tiny networks, the outer selection, the perturbation pass step by step, the normalised space, eval mode and frozen BN
statistics, the optimiser, the cache, the record, resume, and no test leak."""
import copy
import csv
import json
import shutil

import pytest
import torch
from torch import nn
from torch.func import functional_call

import defense.ibau as ibau
from models import build_model
from utils.errors import UserError
from utils.seeding import generator

DEFAULTS = {o.name: o.default for o in ibau.OPTIONS}


def cfg(**kw):
    return {**DEFAULTS, **kw}


def cnn(seed=0, width=2):
    torch.manual_seed(seed)
    return build_model("cnn", 10, 1, (0.3,), (0.4,), width).eval()


# --- the hypergradient ----------------------------------------------------------------------------------------

TOY_IN = lambda d, p: 0.5 * 2.0 * d.pow(2).sum() - (p[0] * d).sum()             # noqa: E731  h = 2
TOY_OUT = lambda d, p: 0.5 * (d - 0.5).pow(2).sum() + 0.5 * p[0].pow(2).sum()  # noqa: E731  c = 0.5


@pytest.mark.parametrize("K, tol, expect, iters", [(5, 1e-10, 3.16808, 5), (0, 1e-10, 3.0, 0),
                                                   (200, 1e-10, 3.25, None), (5, 0.35, 3.122, 3)])
def test_hypergradient_on_the_scalar_toy(K, tol, expect, iters):
    theta = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    g, n, c, o = ibau.hypergradient(TOY_IN, TOY_OUT, torch.tensor([1.0], dtype=torch.float64), [theta], K, 0.1, tol)
    assert g[0].item() == pytest.approx(expect, abs=1e-9) and c[0].item() == 3.0
    assert o.item() == pytest.approx(0.125 + 4.5)
    if iters is not None:
        assert n == iters


def explicit_hypergradient(model, l_in_f, l_out_f, delta, K, eta):
    """c + J_theta(Phi)^T sum_{t<K} (J_delta(Phi)^T)^t a with full Jacobians (torch.autograd.functional.jacobian)."""
    names = [k for k, _ in model.named_parameters()]
    theta = [p.detach() for p in model.parameters()]

    def phi(d, *th):
        p = dict(zip(names, th))
        g, = torch.autograd.grad(l_in_f(d, p), d, create_graph=True)
        return d - eta * g
    jac = torch.autograd.functional.jacobian(phi, (delta, *theta), create_graph=False)
    n = delta.numel()
    j_d = jac[0].reshape(n, n)
    outs = torch.autograd.functional.jacobian(lambda d, *th: l_out_f(d, dict(zip(names, th))), (delta, *theta))
    a, c = outs[0].reshape(n), [o for o in outs[1:]]
    v, term = torch.zeros(n, dtype=delta.dtype), a.clone()
    for _ in range(K):
        v, term = v + term, j_d.T @ term
    return [ci + (jt.reshape(n, -1).T @ v).reshape(ci.shape) for ci, jt in zip(c, jac[1:])]


class Linear2x2(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("name", ["linear", "cnn"])
def test_hypergradient_equals_explicit_jacobians(name):
    model = (Linear2x2() if name == "linear" else cnn(1)).double().eval()
    size = 2 if name == "linear" else 8                 # 8x8: the CNN's pools still reach 2x2
    g = torch.Generator().manual_seed(0)
    x1, x = torch.rand(6, 1, size, size, generator=g, dtype=torch.float64), torch.rand(5, 1, size, size, generator=g,
                                                                                      dtype=torch.float64)
    y1, y = torch.randint(0, 2, (6,), generator=g), torch.randint(0, 2, (5,), generator=g)
    sel = torch.tensor([1, 3])
    delta = torch.randn(1, 1, size, size, generator=g, dtype=torch.float64) * 0.3
    f_in = lambda d, p: ibau.inner_loss(lambda z: functional_call(model, p, (z,)), x1, y1, d, 0.05)    # noqa: E731
    f_out = lambda d, p: ibau.outer_loss(lambda z: functional_call(model, p, (z,)), x, y, d, sel)      # noqa: E731
    expect = explicit_hypergradient(model, f_in, f_out, delta, 4, 0.1)
    params = list(model.parameters())
    got, n, c, _ = ibau.hypergradient(lambda d, _: ibau.inner_loss(model, x1, y1, d, 0.05),
                                      lambda d, _: ibau.outer_loss(model, x, y, d, sel), delta, params, 4, 0.1, 0.0)
    assert n == 4
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(got, expect))
    assert any(not torch.allclose(a, b, atol=1e-9) for a, b in zip(got, c))   # the implicit term is there


def test_outer_selection_and_the_plain_gradient_without_it():
    gen = torch.Generator().manual_seed(0)
    assert [len(ibau.outer_selection(b, 0.01, gen)) for b in (256, 196, 99)] == [2, 1, 0]
    s = ibau.outer_selection(256, 0.5, gen)
    assert len(set(s.tolist())) == 128
    model = cnn(2)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    delta = torch.randn(1, 1, 28, 28)
    params = list(model.parameters())
    g, n, _, _ = ibau.hypergradient(lambda d, _: ibau.inner_loss(model, x, y, d, 1e-3),
                                    lambda d, _: ibau.outer_loss(model, x, y, d, torch.tensor([], dtype=torch.long)),
                                    delta, params, 5, 0.1, 1e-10)
    plain = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    assert n == 0 and all(torch.equal(a, b) for a, b in zip(g, plain))
    seen = []
    h = model.normalize.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
    ibau.outer_loss(model, x, y, delta, torch.tensor([2, 5]))
    h.remove()
    changed = (seen[0] != x).flatten(1).any(1)
    assert changed.tolist() == [i in (2, 5) for i in range(8)] and torch.equal(seen[0][2], x[2] + delta[0])


# --- the perturbation pass, the perturbed input --------------------------------------------------------------------

def test_perturbation_pass_steps_by_hand():
    model, lam, eta = cnn(4), 0.01, 10.0
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.rand(5, 1, 28, 28, generator=g), torch.rand(7, 1, 28, 28, generator=g)

    def ce_grad(x, d):   # d_delta mean CE(f(x + delta), the model's own predictions)
        d = d.clone().requires_grad_(True)
        with torch.no_grad():
            y_hat = model(x).argmax(1)
        return torch.autograd.grad(nn.functional.cross_entropy(model(x + d), y_hat), d)[0]
    d1 = eta * ce_grad(xa, torch.zeros(1, 1, 28, 28))
    d2 = d1 + eta * ce_grad(xb, d1) - eta * 2 * lam * d1
    got1, _ = ibau.perturbation_pass(model, [xa], eta, lam)
    got2, j = ibau.perturbation_pass(model, [xa, xb], eta, lam)
    assert torch.allclose(got1, d1, atol=1e-6) and torch.allclose(got2, d2, atol=1e-5)
    assert not torch.equal(d2, d1 + eta * ce_grad(xb, d1))       # the regulariser acts from the second step on
    assert isinstance(float(j), float)
    half = got2.norm().item() / 2
    assert ibau.project(got2, half).norm().item() == pytest.approx(half, rel=1e-5)
    assert torch.equal(ibau.project(got2, None), got2) and torch.equal(ibau.project(got2, 3 * half), got2)


def test_normalized_space_is_the_perturbation_of_the_normalised_tensor_and_nothing_clamps():
    model = cnn(5)
    x, delta = torch.rand(3, 1, 28, 28), torch.randn(1, 1, 28, 28)
    s = ibau.perturbation_scale(model, "normalized")
    assert ibau.perturbation_scale(model, "pixel") is None
    with torch.no_grad():
        direct = model.head(model.body(model.normalize(x) + delta))
        assert torch.allclose(model(ibau.perturb(x, delta, s)), direct, atol=1e-5)
    seen = []
    h = model.normalize.register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    with torch.no_grad():
        model(ibau.perturb(torch.ones(1, 1, 28, 28), torch.full((1, 1, 28, 28), 0.5)))
    h.remove()
    assert seen[0].max().item() == 1.5


# --- the round: eval mode, frozen statistics, every parameter moves, delta reset, constant lr ------------------------

def round_setup(seed=0, n=32):
    model = cnn(seed, width=4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    c = cfg(batch_size=16, unlearn_portion=0.25, lr=1e-3, K=2)
    aug = lambda b, gen: ibau.random_crop_flip(b, gen, 1, False)   # noqa: E731
    cache = ibau.cached_batches(x, y, 16, generator(0, "ibau_cache"), aug)
    gens = {k: generator(0, k) for k in ("shuffle", "augmentation", "unlearn_select")}
    return model, x, c, aug, cache, gens


def test_round_in_eval_mode_keeps_bn_statistics_moves_every_parameter_and_resets_delta():
    model, x, c, aug, cache, gens = round_setup()
    opt = ibau.make_optimizer(model.parameters(), c)
    before = copy.deepcopy(model.state_dict())
    modes = []
    hooks = [m.register_forward_pre_hook(lambda m, _: modes.append(m.training)) for m in model.modules()]
    row1, _ = ibau.ibau_round(model, opt, cache, x, c, gens, aug)
    for h in hooks:
        h.remove()
    assert modes and not any(modes)
    after = model.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert all(not torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert row1["n_perturbed"] == 4 + 4 and 1 <= row1["fp_iters"] <= 2 and 0 <= row1["pert_flip_rate"] <= 1
    assert row1["implicit_grad_norm"] > 0
    # round 2 starts again from delta = 0: its delta is a fresh pass over the same draws with the current model
    shuffle, augm = (torch.Generator().set_state(gens[k].get_state()) for k in ("shuffle", "augmentation"))
    idx = ibau.batch_indices(len(x), 16, shuffle)
    fresh, _ = ibau.perturbation_pass(model, [aug(ibau.to_unit(x[i]), augm) for i in idx], c["pert_lr"], c["pert_reg"])
    row2, d2 = ibau.ibau_round(model, opt, cache, x, c, gens, aug)
    assert torch.equal(d2, fresh) and row1["lr"] == row2["lr"] == opt.param_groups[0]["lr"] == 1e-3


def test_optimizer_and_cache():
    model = cnn()
    opt = ibau.make_optimizer(model.parameters(), cfg(amsgrad=False, adam_betas=[0.5, 0.9], lr=2e-3))
    assert opt.param_groups[0]["amsgrad"] is False and opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert ibau.make_optimizer(model.parameters(), cfg()).param_groups[0]["amsgrad"] is True
    assert ibau.betas("0.8,0.99") == [0.8, 0.99]
    with pytest.raises(ValueError):
        ibau.betas("0.9")
    _, x, _, aug, _, _ = round_setup(1, n=40)
    y = torch.arange(40) % 10
    a = ibau.cached_batches(x, y, 16, generator(0, "ibau_cache"), aug)
    b = ibau.cached_batches(x, y, 16, generator(0, "ibau_cache"), aug)
    other = ibau.cached_batches(x, y, 16, generator(1, "ibau_cache"), aug)
    assert [len(t) for _, t in a] == [16, 16, 8]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], other[0][0])


# --- the script: options, record, resume, no test leak ---------------------------------------------------------------

def copy_record(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("defense"))
    return dst


def rows_of(path):
    with open(path / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


EXTRA = ["--n_rounds", "3", "--ratio", "0.1", "--batch_size", "32", "--unlearn_portion", "0.1", "--K", "2",
         "--lr", "1e-3", "--device", "{device}", "--amp", "false", "--channels_last", "false"]


def test_refused_keys(tiny_record, tmp_path):
    for flag in ("--epochs", "--lr_scheduler", "--optim"):
        with pytest.raises(UserError, match="unknown option"):
            ibau.configure(["--result_file", str(tiny_record), flag, "1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr_scheduler: CosineAnnealingLR\n")
    with pytest.raises(UserError, match="unknown key 'lr_scheduler'"):
        ibau.configure(["--result_file", str(tiny_record), "--yaml_path", str(bad)])
    c, args = ibau.configure(["--result_file", str(tiny_record)])
    assert c["crop_padding"] == 1 and "lr = 0.001 (spec: 0.0001)" in args.deviations
    assert not any(d.startswith("crop_padding") for d in args.deviations)


@pytest.mark.device
def test_record_and_resume_without_test_leak(tiny_record, tmp_path, monkeypatch, run_device):
    extra = [v.format(device=run_device) for v in EXTRA]
    a = copy_record(tiny_record, tmp_path / "a")
    s = ibau.main(["--result_file", str(a), *extra])
    out = a / "defense" / "i-bau"
    for f in ("config.yaml", "model.pt", "metrics.csv", "summary.json", "curves.png", "index.txt",
              "perturbations.pt", "perturbation.png"):
        assert (out / f).exists(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary == s and s["updates"] == 3 * 2 and s["K"] == 2
    for k in ("test_acc", "test_asr", "test_ra", "attack_test_asr", "der", "rir", "pert_norm_last"):
        assert k in s, k
    rows = rows_of(out)
    for k in ("pert_norm", "pert_linf", "pert_loss", "pert_flip_rate", "unlearn_loss", "n_perturbed", "fp_iters",
              "hypergrad_norm", "direct_grad_norm", "implicit_grad_norm", "clean_test_loss", "bd_test_loss",
              "ra_test_loss", "test_acc"):
        assert k in rows[0], k
    assert [r["n_perturbed"] for r in rows] == ["5"] * 3            # 3 + 2 of batches 32 and 28
    deltas = torch.load(out / "perturbations.pt", weights_only=True)
    assert sorted(deltas) == [1, 2, 3] and deltas[3].shape == (1, 1, 28, 28)
    assert float(rows[2]["pert_norm"]) == pytest.approx(deltas[3].norm().item(), rel=1e-6)

    # interrupted after the checkpoint of round 2, resumed: the uninterrupted run bit for bit. The first session
    # evaluates on other test sets: the weights must not notice (the test data is only ever evaluated)
    from utils.run_folder import Run
    original, real_open = Run.save_checkpoint, ibau.open_defense

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
    monkeypatch.setattr(ibau, "open_defense", scrambled)
    with pytest.raises(KeyboardInterrupt):
        ibau.main(["--result_file", str(b), *extra])
    monkeypatch.setattr(Run, "save_checkpoint", original)
    monkeypatch.setattr(ibau, "open_defense", real_open)
    ibau.main(["--result_file", str(b), *extra, "--resume"])
    ob = b / "defense" / "i-bau"
    wa = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(ob / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = rows_of(out), rows_of(ob)
    test_keys = [k for k in ra[0] if "test" in k or k.startswith("bd_")]   # what the evaluation writes
    assert ra[2] == rb[2] and [r[k] for r in ra for k in test_keys] != [r[k] for r in rb for k in test_keys]
    assert [{k: v for k, v in r.items() if k not in test_keys} for r in ra] == \
           [{k: v for k, v in r.items() if k not in test_keys} for r in rb]
    resumed = torch.load(ob / "perturbations.pt", weights_only=True)
    assert sorted(resumed) == [1, 2, 3] and all(torch.equal(deltas[k], v) for k, v in resumed.items())
