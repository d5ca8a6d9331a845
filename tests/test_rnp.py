"""RNP (docs/specs/rnp.md §9): the ascent step and its clipping, the schedule and the early stop, the recover step
against hand computations, frozen parts stay frozen, pruning of the attacked model (not the unlearned one), no test
data in the masks or the choice, and resume before, right after and past the unlearning stop."""
import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from defense import anp_pruning as ap
from defense import rnp
from models import build_model
from utils.engine.device import Precision
from utils.engine.loop import fit
from utils.model_file import load_model_file
from utils.run_folder import Run
from tests.test_anp import A, X, Y, Toy

CPU = Precision(torch.device("cpu"), False, False)
sig = lambda v: 1 / (1 + math.exp(-v))         # noqa: E731


class OneWeight(nn.Module):
    """logits (theta x, 0)."""

    def __init__(self, theta=1.0):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))

    def forward(self, x):
        z = self.theta * x[:, 0]
        return torch.stack([z, torch.zeros_like(z)], 1)


def ascend(theta, x, wd, clip=None):
    m = OneWeight(theta)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=wd)
    loss, _, norm = rnp.ascent_step(m, torch.tensor([[x]]), torch.tensor([0]), opt, CPU, clip)
    return m.theta.item(), loss.item(), norm.item()


def test_the_ascent_step_raises_the_loss_with_weight_decay_and_clips_only_when_asked():
    theta, loss, _ = ascend(1.0, 1.0, 5e-4)
    assert theta == pytest.approx(1 - 0.01 * (sig(-1) + 5e-4), abs=1e-6) and theta == pytest.approx(0.997306, abs=1e-6)
    assert ascend(theta, 1.0, 5e-4)[1] > loss                           # the CE rises
    assert ascend(1.0, 1.0, 0.0)[0] == pytest.approx(1 - 0.01 * sig(-1), abs=1e-7)
    assert ascend(0.0, 80.0, 0.0) == pytest.approx((-0.4, math.log(2), 40.0))          # norm 40: no clip by default
    assert ascend(0.0, 80.0, 0.0, clip=20.0) == pytest.approx((-0.2, math.log(2), 40.0))   # halved with clip 20


def scripted_unlearning(tmp_path, monkeypatch, accs, epochs=20):
    """The rows of the unlearning phase when its epochs give the scripted accuracies."""
    u = OneWeight()
    opt = torch.optim.SGD(u.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    state = {"unlearn_opt": opt, "unlearn_sched": torch.optim.lr_scheduler.MultiStepLR(opt, [10, 20], 0.1)}
    ctx = SimpleNamespace(cfg={"clip_grad_norm": None, "unlearning_epochs": epochs, "clean_threshold": 0.2},
                          evaluate=lambda m: {"test_acc": 0.5, "test_asr": 1.0}, precision=CPU)
    it = iter(accs)
    monkeypatch.setattr(rnp, "epoch_over", lambda *a: (1.0, next(it), torch.tensor(1.0)))
    run = Run(tmp_path / f"r{len(accs)}", "rnp", {})
    rows = fit(run, [rnp.unlearn_phase(ctx, u, None, None, state)], state)
    run.close()
    return rows


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")   # the scripted epochs take no step
def test_the_schedule_and_the_early_stop_of_the_ascent(tmp_path, monkeypatch):
    rows = scripted_unlearning(tmp_path, monkeypatch, [0.98, 0.50, 0.19, 0.1])
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert scripted_unlearning(tmp_path, monkeypatch, [0.9, 0.2, 0.1])[-1]["epoch"] == 2   # 0.2 exactly stops (<=)
    rows = scripted_unlearning(tmp_path, monkeypatch, [0.5] * 20)
    assert [r["lr"] for r in rows] == pytest.approx([0.01] * 10 + [0.001] * 10)
    rows = [{**r, "phase": "unlearn"} for r in rows] + [{"phase": "recover", "train_acc": 0.9, "seconds": 1.0}]
    s = rnp.unlearn_summary(rows, 0.2)
    assert s["unlearn_epochs_run"] == 20 and s["unlearn_reached_threshold"] is False


def test_the_recover_step_matches_the_hand_computation_and_alpha_is_a_lr_scale():
    r = ap.masked_copy(Toy(), noise=False).train()
    layers = ap.masked_layers(r)
    opt = torch.optim.SGD([layers[0].mask], lr=0.2, momentum=0.9)
    assert 2 * A * sig(2 * A) == pytest.approx(1.761583, abs=1e-6)
    rnp.recover_step(r, layers, X, Y, opt, 0.2, CPU)
    assert layers[0].mask.item() == pytest.approx(1 - 0.2 * 0.2 * 2 * A * sig(2 * A), abs=1e-6)
    assert layers[0].mask.item() == pytest.approx(0.929537, abs=1e-6)
    masks = []
    for alpha, lr in ((0.2, 0.2), (1.0, 0.04)):
        torch.manual_seed(0)
        m = build_model("cnn", 10, 1, (0.5,), (0.5,), 4)
        r = ap.masked_copy(m, noise=False).train()
        layers = ap.masked_layers(r)
        opt = torch.optim.SGD([layer.mask for layer in layers], lr=lr, momentum=0.9)
        x, y = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)), torch.arange(8)
        for _ in range(4):
            rnp.recover_step(r, layers, x, y, opt, alpha, CPU)
        masks.append(ap.mask_vector(layers))
    assert torch.allclose(masks[0], masks[1], atol=1e-5) and (masks[0] < 1).any()
    assert masks[0].min() >= 0 and masks[0].max() <= 1
    toy = ap.masked_copy(Toy(), noise=False).eval()   # the shift is never masked: mask 0 leaves beta
    with torch.no_grad():
        toy.bn.bias.fill_(0.3), toy.bn.mask.zero_()
        assert torch.allclose(toy(X), torch.tensor([[0.3, -0.3]] * 2))


def test_recovering_moves_only_the_masks_and_ignores_the_running_buffers():
    torch.manual_seed(0)
    u = build_model("cnn", 10, 1, (0.5,), (0.5,), 4)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    masks = []
    for momentum in (0.1, 0.0):
        r = ap.masked_copy(build_model("cnn", 10, 1, (0.5,), (0.5,), 4), noise=False)
        missing, unexpected = r.load_state_dict(u.state_dict(), strict=False)
        assert not unexpected and all(k.endswith(".mask") for k in missing) and len(missing) == 4
        layers = ap.masked_layers(r)
        for layer in layers:
            layer.momentum = momentum
        opt = torch.optim.SGD([layer.mask for layer in layers], lr=0.2, momentum=0.9)
        for _ in range(3):
            rnp.recover_step(r.train(), layers, x, y, opt, 0.2, CPU)
        weights = {k: v for k, v in r.named_parameters() if not k.endswith(".mask")}
        assert all(torch.equal(v, u.state_dict()[k]) for k, v in weights.items())
        masks.append(ap.mask_vector(layers))
    assert torch.equal(masks[0], masks[1]) and (masks[0] < 1).any()
    assert ap.prune_set(torch.tensor([0.7, 0.70001, 0.1]), "threshold", 0.7) == [2, 0]   # fp32(0.7) is pruned
    assert len(ap.prune_set(torch.rand(10), "number", 3)) == 3


def run_rnp(record, *extra):
    return rnp.main(["--result_file", str(record), "--unlearning_epochs", "4", "--recovering_epochs", "2",
                     "--batch_size", "32", "--ratio", "0.1", "--eval_batch_size", "256", "--pruning_by", "number",
                     "--pruning_number", "6", "--pruning_max", "40", "--pruning_step", "20", *extra])


def outputs(out):
    with open(out / "metrics.csv") as f:
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
    model, _ = load_model_file(out / "model.pt")
    p = json.loads((out / "pruned.json").read_text())
    return rows, (out / "masks.csv").read_text(), p["neurons"], [v.clone() for v in model.state_dict().values()]


def same(a, b):
    return a[:3] == b[:3] and all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


def test_a_run_prunes_the_attacked_model_and_resumes_before_at_and_after_the_stop(tiny_record, monkeypatch):
    out = Path(tiny_record) / "defense" / "rnp"
    monkeypatch.setattr(rnp, "stop_rule", lambda c: lambda row: row["epoch"] >= 2)   # a known stop: after epoch 2
    s = run_rnp(tiny_record, "--save_unlearned", "true")
    full = outputs(out)
    assert [(r["phase"], r["epoch"]) for r in full[0]] == \
        [("unlearn", "1"), ("unlearn", "2"), ("recover", "1"), ("recover", "2"), ("prune", "0")]
    assert s["unlearn_epochs_run"] == 2 and s["n_pruned"] == 6 and (out / "unlearned_model.pt").exists()
    assert float(full[0][1]["train_loss"]) > 0 and "grad_norm_mean" in full[0][0]
    attacked, _ = load_model_file(Path(tiny_record) / "model.pt")
    ap.apply_pruning(attacked, ap.neuron_table(attacked), full[2])   # M_S of the attacked model, not of U*
    assert all(torch.equal(a, b) for a, b in zip(attacked.state_dict().values(), full[3]))
    from utils import defense   # no test leak: other test data and no test sweep give the same masks, set, model

    class OtherTests(defense.EvalSets):
        def __init__(self, data, device):
            super().__init__(data, device)
            self.x_test = (self.x_test.flip(0) // 2 + 60).to(torch.uint8)
            self.x_bd = self.x_bd.flip(0)
    with monkeypatch.context() as mp:
        mp.setattr(defense, "EvalSets", OtherTests)
        run_rnp(tiny_record, "--log_test_during_pruning", "false", "--overwrite")
    other = outputs(out)
    assert other[1:3] == full[1:3] and all(torch.equal(a, b) for a, b in zip(other[3], full[3]))
    assert [r["clean_test_loss"] for r in other[0]] != [r["clean_test_loss"] for r in full[0]]   # they did change
    original = Run.save_checkpoint
    for case, (kill_phase, kill_epoch) in {"inside unlearn": (0, 1), "right after the stop": (0, 4),
                                           "inside recover": (1, 1)}.items():
        def die(self, epoch, state, phase=0):
            original(self, epoch, state, phase)
            if (phase, epoch) == (kill_phase, kill_epoch):
                raise KeyboardInterrupt
        shutil.rmtree(out)
        monkeypatch.setattr(Run, "save_checkpoint", die)
        with pytest.raises(KeyboardInterrupt):
            run_rnp(tiny_record)
        monkeypatch.setattr(Run, "save_checkpoint", original)
        step = rnp.ascent_step
        if kill_phase == 0 and kill_epoch == 4:   # the stop is in the checkpoint: no further ascent epoch
            monkeypatch.setattr(rnp, "ascent_step", lambda *a: pytest.fail("an ascent epoch ran after the stop"))
        run_rnp(tiny_record, "--resume")
        monkeypatch.setattr(rnp, "ascent_step", step)
        assert same(outputs(out), full), case
