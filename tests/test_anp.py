"""ANP (docs/specs/anp.md §9) and the pruning it shares with RNP (defense/anp_pruning.py): the inner step, the mask
step and the masked forward against hand computations on a one-neuron toy, frozen parts stay frozen, neuron counts,
chunks, the pruning set, order and grid, the clean_acc rule, no test data in the choice, resume."""
import copy
import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from defense import anp, anp_pruning as ap
from models import MODELS, build_model
from utils.engine.device import Precision
from utils.errors import UserError
from utils.model_file import load_model_file
from utils.run_folder import Run

CPU = Precision(torch.device("cpu"), False, False)
A = (1 + 1e-5) ** -0.5                         # x_hat of the toy batch (+1, -1) in train mode
sig = lambda v: 1 / (1 + math.exp(-v))         # noqa: E731


class Toy(nn.Module):
    """One BN channel on 1x1 inputs (gamma 1, beta 0), logits (z, -z)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x):
        return self.head(self.bn(x).flatten(1))


X, Y = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1), torch.tensor([1, 0])


def toy_work():
    w = ap.masked_copy(Toy())
    return w.train(), ap.masked_layers(w)


def test_the_inner_step_raises_the_loss_by_a_signed_step_and_clips_only_when_asked():
    w, layers = toy_work()
    anp.inner_steps(w, layers, X, Y, 0.4, 1, False, CPU)
    assert layers[0].noise_w.item() == pytest.approx(0.4) and layers[0].noise_b.item() == 0   # sign(0) = 0 (beta 0)
    for clip, want in ((True, 0.4), (False, 0.7)):
        w, layers = toy_work()
        with torch.no_grad():
            layers[0].noise_w.fill_(0.3)
        anp.inner_steps(w, layers, X, Y, 0.4, 1, clip, CPU)
        assert layers[0].noise_w.item() == pytest.approx(want)


def test_the_mask_step_matches_the_hand_computation_with_momentum_and_clamp():
    w, layers = toy_work()
    opt = torch.optim.SGD([layers[0].mask], lr=0.2, momentum=0.9)
    with torch.no_grad():
        layers[0].noise_w.fill_(0.4)

    def step():
        loss = anp.outer_loss(w, layers, X, Y, 0.4, 0.2, CPU)[0]
        anp.mask_step(layers, loss, opt)
    g1 = 0.2 * 2 * A * sig(2 * A) + 0.8 * 2 * A * sig(2.8 * A)
    assert g1 == pytest.approx(1.860589, abs=1e-6)
    step()
    m1 = layers[0].mask.item()
    assert m1 == pytest.approx(0.627882, abs=1e-6)
    opt.param_groups[0]["lr"] = 0.05                        # a second step with momentum: v = 0.9 g1 + g2
    step()
    g2 = 0.2 * 2 * A * sig(2 * m1 * A) + 0.8 * 2 * A * sig(2 * (m1 + 0.4) * A)
    assert layers[0].mask.item() == pytest.approx(m1 - 0.05 * (0.9 * g1 + g2), abs=1e-6)
    opt.param_groups[0]["lr"] = 100.0                       # a huge step: clamped to 0 exactly, never below
    step()
    assert layers[0].mask.item() == 0.0
    w, layers = toy_work()                                  # eps = 0: alpha * lr times the gradient of L_nat
    opt = torch.optim.SGD([layers[0].mask], lr=0.2, momentum=0.9)
    anp.mask_step(layers, anp.outer_loss(w, layers, X, Y, 0.0, 0.2, CPU)[0], opt)
    assert layers[0].mask.item() == pytest.approx(1 - 0.2 * 0.2 * 2 * A * sig(2 * A), abs=1e-6)


def small(name, seed=0):
    torch.manual_seed(seed)
    c, size = (1, 28) if name == "cnn" else (3, 32)
    return build_model(name, 10, c, (0.5,) * c, (0.5,) * c, 8 if name == "cnn" else 4), torch.rand(4, c, size, size)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_masked_forward_is_batch_norm_with_the_perturbed_affine_on_every_model(name):
    m, x = small(name)
    for train in (False, True):   # masks 1, noise 0: the attacked model bit for bit
        a, b = ap.masked_copy(m).train(train), copy.deepcopy(m).train(train)
        with torch.no_grad():
            assert torch.equal(a(x), b(x))
    names = [n for n, _ in ap.bn_layers(m)]
    for pick in (0, len(names) - 1):   # one BN changed at a time
        w, ref = ap.masked_copy(m), copy.deepcopy(m)
        layer = dict(w.named_modules())[names[pick]]
        bn = dict(ref.named_modules())[names[pick]]
        g = torch.Generator().manual_seed(pick)
        c = bn.num_features
        mask, dw, db = torch.rand(c, generator=g), torch.rand(c, generator=g) - 0.5, torch.rand(c, generator=g) - 0.5
        with torch.no_grad():
            layer.mask.copy_(mask), layer.noise_w.copy_(dw), layer.noise_b.copy_(db)
            bn.weight.mul_(mask + dw), bn.bias.mul_(1 + db)
        layer.perturbed = True
        for train in (False, True):
            with torch.no_grad():
                assert torch.allclose(w.train(train)(x), ref.train(train)(x), atol=1e-5), (name, pick, train)


def test_neuron_counts_and_a_model_without_bn_is_refused():
    counts = {"cnn": (4, 88), "preactresnet18": (16, 3392), "resnet18": (20, 4800), "vgg19_bn": (16, 5504)}
    for name, (modules, neurons) in counts.items():
        c = 1 if name == "cnn" else 3
        m = build_model(name, 10, c, (0.5,) * c, (0.5,) * c)
        assert (len(ap.bn_layers(m)), len(ap.neuron_table(m))) == (modules, neurons), name
    assert [n for n, _ in ap.bn_layers(build_model("preactresnet18", 10, 3, (0.5,) * 3, (0.5,) * 3, 4))][:2] == \
        ["layer1.0.bn1", "layer1.0.bn2"]
    with pytest.raises(UserError, match="no affine BatchNorm"):
        ap.bn_layers(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_iterations_leave_every_weight_frozen_and_the_masks_ignore_the_running_buffers():
    m, x = small("cnn")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y = torch.arange(4)
    cfg = {"anp_eps": 0.4, "anp_steps": 1, "clip_noise": False, "anp_alpha": 0.2}
    masks = []
    for momentum in (0.1, 0.0):   # momentum 0: the running buffers never move
        w = ap.masked_copy(m).train()
        layers = ap.masked_layers(w)
        for layer in layers:
            layer.momentum = momentum
        weights = {k: v.clone() for k, v in w.named_parameters() if not k.endswith(("mask", "noise_w", "noise_b"))}
        opt = torch.optim.SGD([layer.mask for layer in layers], lr=0.2, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            anp.anp_iteration(w, layers, x, y, cfg, opt, gen, CPU)
        assert all(torch.equal(v, dict(w.named_parameters())[k]) and not v.requires_grad for k, v in weights.items())
        masks.append(ap.mask_vector(layers))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())       # the attacked model untouched
    assert (masks[0] < 1).any() and torch.equal(masks[0], masks[1])
    assert anp.chunk_sizes(7, 3) == [3, 3, 1] and anp.chunk_sizes(2000, 500) == [500] * 4


def test_the_pruning_set_order_grid_and_the_pruned_model():
    masks = torch.tensor([0.0, 0.2, 0.20001, 0.5, 0.2], dtype=torch.float32)
    assert sorted(ap.prune_set(masks, "threshold", 0.2)) == [0, 1, 4]          # fp32, no 4-decimal rounding
    assert ap.prune_set(masks, "number", 2) == [0, 1]                          # ties: lower index first; never 2k
    assert ap.prune_set(masks, "number", 3) == [0, 1, 4]
    grid = ap.prune_grid("threshold", 0.05, 0.9)
    assert len(grid) == 19 and grid[3] == 0.15 and grid[-1] == 0.9
    assert ap.prune_grid("number", 20, 100) == [0, 20, 40, 60, 80, 100]
    m, x = small("cnn")
    m.eval()
    with torch.no_grad():
        for _, bn in ap.bn_layers(m):
            bn.bias.uniform_(0.1, 0.5), bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    table, s = ap.neuron_table(m), [0, 9, 87]
    pruned = copy.deepcopy(m)
    ap.apply_pruning(pruned, table, s)
    for k, v in m.state_dict().items():
        diff = (v != pruned.state_dict()[k]).nonzero().flatten().tolist()
        want = {"layers.0.1.weight": [0], "layers.2.1.weight": [1], "layers.5.1.weight": [31]}.get(k, [])
        assert diff == want, k
    out = {}
    hook = pruned.layers[0][1].register_forward_hook(lambda mod, i, o: out.update(z=o))
    with torch.no_grad():
        logits = pruned(x)
    hook.remove()
    assert torch.allclose(out["z"][:, 0], pruned.layers[0][1].bias[0].expand_as(out["z"][:, 0]))   # outputs beta_j
    w = ap.masked_copy(m).eval()   # hard pruning: f(.; 1 - 1_S) with the attacked model's buffers
    keep = torch.ones(len(table))
    keep[s] = 0
    with torch.no_grad():
        for layer, part in zip(ap.masked_layers(w), keep.split([8, 16, 32, 32])):
            layer.mask.copy_(part)
        assert torch.allclose(w(x), logits, atol=1e-6)


def test_clean_acc_keeps_the_last_accepted_point_and_counts_are_checked():
    assert ap.select_clean_acc([0.90, 0.89, 0.85, 0.80, 0.95], 0.1) == 2
    assert ap.select_clean_acc([0.5, 0.6, 0.7], 0.1) == 2                       # a rise is always accepted
    with pytest.raises(UserError, match="none of the clean subset"):
        ap.select_clean_acc([0.0, 0.0], 0.1)
    cfg = {"pruning_by": "number", "pruning_number": 2.0, "pruning_max": 0.9, "pruning_step": 0.05}
    with pytest.raises(UserError, match="pruning_max = 0.9 is not a count"):
        ap.check_pruning(cfg, 88)
    with pytest.raises(UserError, match="leaves no neuron"):
        ap.check_pruning({**cfg, "pruning_number": 88.0, "pruning_max": 80.0, "pruning_step": 8.0}, 88)


def test_the_choice_never_reads_the_test_sets():
    m, x = small("cnn")
    with torch.no_grad():
        y = m.eval()(x).argmax(1)   # the unpruned model is right on all of them
    masks = torch.rand(88, generator=torch.Generator().manual_seed(1))
    out = []
    for selection in ("fixed", "clean_acc"):
        for seed in (0, 1):   # two different "test sets": random figures
            g = torch.Generator().manual_seed(seed)
            cfg = {"pruning_by": "threshold", "pruning_step": 0.05, "pruning_max": 0.9, "acc_ratio": 0.5,
                   "selection": selection, "eval_batch_size": 64, "log_test_during_pruning": True}
            ctx = SimpleNamespace(precision=CPU, cfg=cfg,
                                  evaluate=lambda model: dict(zip(("test_acc", "test_asr", "test_ra"),
                                                                  torch.rand(3, generator=g).tolist())))
            rows, chosen = ap.sweep(ctx, m, masks, x, y)
            out.append(([r["clean_subset_acc"] for r in rows], chosen))
    assert out[0] == out[1] and out[2] == out[3] and out[0][1] is None and out[2][1] is not None


def test_a_subset_without_a_class_is_a_warning_with_the_counts_in_the_config(tmp_path, capsys):
    run = Run(tmp_path / "r", "anp", {})
    ctx = SimpleNamespace(data=SimpleNamespace(num_classes=4), run=run)
    ap.check_subset(ctx, torch.tensor([0, 0, 1, 3]))
    assert "no sample of class(es) [2]" in capsys.readouterr().out
    assert run.meta["clean_subset_class_counts"] == [2, 1, 0, 1]
    run.close()


def run_anp(record, *extra):
    return anp.main(["--result_file", str(record), "--nb_iter", "8", "--print_every", "2", "--batch_size", "32",
                     "--ratio", "0.05", "--eval_batch_size", "256", *extra])


PRUNE = ("--pruning_by", "number", "--pruning_number", "5", "--pruning_max", "40", "--pruning_step", "8")


def rows_of(out):
    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_a_run_prunes_the_attacked_model_and_a_resume_equals_an_uninterrupted_run(tiny_record, monkeypatch):
    out = Path(tiny_record) / "defense" / "anp"
    s = run_anp(tiny_record, *PRUNE)
    p = json.loads((out / "pruned.json").read_text())
    model, _ = load_model_file(out / "model.pt")
    attacked, _ = load_model_file(Path(tiny_record) / "model.pt")
    with open(out / "masks.csv") as f:
        masks = list(csv.DictReader(f))
    assert s["n_pruned"] == p["n_pruned"] == len(p["neurons"]) == sum(int(r["pruned"]) for r in masks)
    assert p["neurons"] == [int(r["neuron"]) for r in sorted(masks, key=lambda r: int(r["rank"]))][:5]
    assert s["n_neurons"] == 88 and "analysis_test_selected" in s and s["iterations"] == 8
    ref = copy.deepcopy(attacked)
    ap.apply_pruning(ref, ap.neuron_table(ref), p["neurons"])
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))
    log = (out / "prune_log.csv").read_text().splitlines()
    assert log[0] == "number,n_pruned,clean_subset_acc,test_acc,test_asr,test_ra,relative_drop,accepted"
    assert len(log) == 7 and s["n_pruned"] == 5 and [r["phase"] for r in rows_of(out)] == ["mask"] * 4 + ["prune"]
    for f in ("index.txt", "config.yaml", "summary.json", "curves.png", "mask_hist.png", "prune_curve.png"):
        assert (out / f).exists(), f
    full = {f: (out / f).read_text() for f in ("masks.csv", "prune_log.csv")}
    full_rows = rows_of(out)
    original = Run.save_checkpoint

    def die(self, epoch, state, phase=0):   # killed after chunk 2 of 4
        original(self, epoch, state, phase)
        if phase == 0 and epoch == 2:
            raise KeyboardInterrupt
    shutil.rmtree(out)
    monkeypatch.setattr(Run, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        run_anp(tiny_record, *PRUNE)
    monkeypatch.setattr(Run, "save_checkpoint", original)
    write = ap.write_pruning

    def die_in_prune(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(ap, "write_pruning", die_in_prune)   # then killed inside phase prune
    with pytest.raises(KeyboardInterrupt):
        run_anp(tiny_record, *PRUNE, "--resume")
    monkeypatch.setattr(ap, "write_pruning", write)
    monkeypatch.setattr(anp, "anp_iteration", lambda *a: pytest.fail("phase mask must not run again"))
    r = run_anp(tiny_record, *PRUNE, "--resume")
    again, _ = load_model_file(out / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert {f: (out / f).read_text() for f in full} == full
    assert {k: v for k, v in json.loads((out / "pruned.json").read_text()).items() if k != "prune_seconds"} == \
        {k: v for k, v in p.items() if k != "prune_seconds"}
    assert rows_of(out) == full_rows and r["test_asr"] == s["test_asr"]
