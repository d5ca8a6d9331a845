"""Neural Cleanse (docs/specs/nc.md §9): the mask parametrisation and stamping, one optimisation step's loss against a
hand computation with the model untouched, the cost schedule and early stop on scripted epochs, the MAD anomaly
index and the flagged classes on hand-made norms, a planted one-pixel backdoor found and flagged, the unlearning
set, the pruning order, and a run on the tiny record: files, summary keys, no-flag case, resume at the next class."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defense import nc
from models import build_model
from utils.config import resolve
from utils.model_file import load_model_file
from utils.seeding import generator


def cfg(**kw):
    return resolve(nc.OPTIONS, [("test", kw)])


# --- the trigger --------------------------------------------------------------------------------------------------

def test_the_mask_parametrisation_stays_in_the_unit_interval_and_inverts():
    assert torch.equal(nc.to_unit_interval(torch.zeros(3)), torch.full((3,), 0.5))
    assert abs(nc.to_unit_interval(torch.ones(1)).item() - 0.8808) < 1e-4          # the constant start
    m = nc.to_unit_interval(torch.linspace(-5, 5, 101))
    assert (m > 0).all() and (m < 1).all()
    big = nc.to_unit_interval(torch.tensor([-1e4, 1e4]))                          # saturated (float32): the edges
    assert (big >= 0).all() and (big <= 1).all()
    v = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    theta = nc.from_unit_interval(v)
    assert torch.isfinite(theta).all() and torch.allclose(nc.to_unit_interval(theta), v, atol=1e-6)


def test_stamping_blends_broadcasts_and_rounds_once():
    x, p = torch.rand(2, 3, 4, 4), torch.rand(3, 4, 4)
    assert torch.equal(nc.stamp(x, torch.zeros(1, 4, 4), p), x)
    assert torch.equal(nc.stamp(x, torch.ones(4, 4), p), p.expand_as(x))
    m = torch.rand(1, 4, 4)
    s = nc.stamp(x, m, p)
    assert torch.allclose(s[:, 1], (1 - m[0]) * x[:, 1] + m[0] * p[1]) and s.min() >= 0 and s.max() <= 1
    xu = torch.tensor([0, 255, 100], dtype=torch.uint8).view(1, 1, 1, 3)
    out = nc.stamp_uint8(xu, torch.full((1, 3), 0.25), torch.full((1, 1, 3), 0.8))
    # 255 (0.75 x + 0.2): 51, 242.25, 126
    assert out.dtype == torch.uint8 and out.flatten().tolist() == [51, 242, 126]


def test_one_step_minimises_ce_plus_cost_times_the_mask_norm_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = build_model("cnn", 10, 1, (0.5,), (0.5,), 2)
    model.train()                            # frozen() must put it in eval mode: BN statistics must not move
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(5, 1, 28, 28)
    theta = [torch.randn(1, 28, 28, requires_grad=True), torch.randn(1, 28, 28, requires_grad=True)]
    start = [t.detach().clone() for t in theta]
    for use_norm in (1, 2):
        c = cfg(use_norm=use_norm)
        opt = torch.optim.Adam(theta, lr=0.1, betas=(0.5, 0.9))
        m, p = (nc.to_unit_interval(t.detach()) for t in theta)
        with torch.no_grad():
            model.eval()
            ce = F.cross_entropy(model((1 - m) * x + m * p), torch.full((5,), 3))
            model.train()
        reg = m.sum() if use_norm == 1 else m.pow(2).sum().sqrt()
        with nc.frozen(model):
            loss, ce_got, reg_got, _ = nc.trigger_step(model, x, 3, theta, opt, 0.01, c).tolist()
        assert abs(reg_got - reg.item()) < 1e-3 and abs(ce_got - ce.item()) < 1e-5
        assert abs(loss - (ce.item() + 0.01 * reg.item())) < 1e-5
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not torch.equal(a, t.detach()) for a, t in zip(start, theta))


# --- the schedule -------------------------------------------------------------------------------------------------

def run_schedule(c, asrs, regs=None):
    s, out = nc.new_schedule(c), []
    for i, asr in enumerate(asrs):
        out.append((*nc.end_of_epoch(s, asr, regs[i] if regs else 10.0 - i, c), s["cost"]))
    return s, out


def test_the_cost_moves_after_patience_consecutive_successes_or_failures():
    c = cfg(early_stop=False)
    s, out = run_schedule(c, [0.99] * 5)
    assert [o[3] for o in out] == [1e-3] * 4 + [2e-3] and out[-1][1] == "up" and s["up_flag"]
    s, out = run_schedule(c, [0.99] * 4 + [0.5])
    assert all(o[3] == 1e-3 for o in out) and not s["up_flag"]
    s, out = run_schedule(c, [0.99] * 4 + [0.5] * 5)
    assert out[-1][3] == pytest.approx(1e-3 / 2 ** 1.5) and out[-1][1] == "down" and s["down_flag"]
    c0 = cfg(early_stop=False, reset_cost_to_zero=True)
    s, out = run_schedule(c0, [0.99] * 5)
    assert [o[3] for o in out] == [0.0] * 4 + [1e-3] and out[-1][1] == "init"
    assert s["up"] == 1 and not s["up_flag"] and not s["down_flag"]
    s, out = run_schedule(c0, [0.5] * 5)
    assert out[-1][3] == 0.0 and s["down_flag"]


def test_early_stop_needs_both_moves_and_stalled_best_norms():
    c = cfg(early_stop_patience=3)
    s, out = run_schedule(c, [0.99] * 20, [10.0] * 20)    # stalled, but the cost never came down: no stop
    assert s["es"] >= 3 and not s["down_flag"] and not any(o[2] for o in out)
    for tau, step, counts in ((0.99, 0.995, True), (0.99, 0.98, False), (1.0, 0.995, False)):
        c = cfg(early_stop_threshold=tau, early_stop_patience=3)
        s = nc.new_schedule(c)
        s.update(up_flag=True, down_flag=True, best=10.0, es_ref=10.0, up=2)   # the 3rd epoch would raise the cost
        stops, reg = [], 10.0
        for _ in range(3):
            reg *= step
            stops.append(nc.end_of_epoch(s, 0.99, reg, c))
        assert (stops[-1][2] and stops[-1][1] == "early_stop") == counts, (tau, step)
        assert not any(st[2] for st in stops[:-1])
        # the stopping epoch never changes the cost; otherwise the 3rd success in a row (5 with up=2) raises it
        assert s["cost"] == (1e-3 if counts else 2e-3) and stops[-1][1] == ("early_stop" if counts else "up")


# --- the anomaly index --------------------------------------------------------------------------------------------

def test_the_mad_anomaly_index_on_hand_made_norms():
    norms = [10, 50, 52, 54, 55, 56, 58, 60, 61, 70]
    a, med, mad = nc.anomaly_index(norms, "mean")
    assert med == 55.5 and mad == pytest.approx(1.4826 * 4.0)
    assert a[0].item() == pytest.approx(45.5 / 5.9304, abs=1e-4) and a[0].item() == pytest.approx(7.672, abs=1e-3)
    assert a[-1].item() == pytest.approx(-2.445, abs=1e-3)                      # large side: never flagged
    assert nc.flagged_classes(a, norms) == [0] and a.max().item() == a[0].item()
    a_low, med_low, mad_low = nc.anomaly_index(norms, "lower")
    assert med_low == 55 and mad_low == pytest.approx(4.4478) and a_low[0].item() == pytest.approx(10.117, abs=1e-3)
    a2, _, _ = nc.anomaly_index([1.0, 3.0, 4.0, 5.0, 6.0])                     # a_0 = (4 - 1) / (1.4826 * 1)
    assert nc.flagged_classes(a2, [1.0, 3.0, 4.0, 5.0, 6.0], threshold=a2[0].item()) == []   # strictly above
    big = [50, 52, 54, 55, 56, 58, 200]
    a3, _, _ = nc.anomaly_index(big)
    assert nc.flagged_classes(a3, big) == [] and a3.max() < 2
    flat = [5.0, 5.0, 5.0, 1.0, 9.0]
    a4, _, mad4 = nc.anomaly_index(flat)
    assert mad4 == 0 and a4.tolist() == [0.0, 0.0, 0.0, math.inf, -math.inf] and nc.flagged_classes(a4, flat) == [3]
    two = [1.0, 2.0, 30.0, 31.0, 32.0, 33.0, 34.0]
    a5, _, _ = nc.anomaly_index(two)
    assert nc.flagged_classes(a5, two) == [0, 1]                              # by increasing norm


# --- a planted one-pixel backdoor ---------------------------------------------------------------------------------

class RowModel(nn.Module):
    """4 classes on 1x6x6 images: class c is a bright row c; pixel (5, 5) adds 30 to class 2's logit (the backdoor)."""

    def __init__(self, planted=True):
        super().__init__()
        w = torch.zeros(4, 1, 6, 6)
        for c in range(4):
            w[c, 0, c, :] = 3.0
        if planted:
            w[2, 0, 5, 5] = 30.0
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x[:, None] * self.w[None]).flatten(2).sum(2)


def test_a_planted_pixel_is_recovered_and_flagged():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.rand(200, 1, 6, 6, generator=g) * 0.1
    x[torch.arange(200), 0, y] = 0.9
    xu = torch.round(x * 255).to(torch.uint8)
    c = cfg(nc_batch_size=200, nc_epoch=30, init_cost=1e-2)
    for planted in (True, False):
        model = RowModel(planted)
        assert (model(x).argmax(1) == y).float().mean() == 1
        res = [nc.reverse_engineer(model, xu, k, c) for k in range(4)]
        norms = [r["norm"] for r in res]
        if planted:
            a, _, _ = nc.anomaly_index(norms)
            m2 = res[2]["mask"]
            assert nc.flagged_classes(a, norms) == [2] and a[2] > 2 and res[2]["reached"], norms
            assert m2[5, 5] / m2.sum() > 0.5 and norms[2] < min(norms[:2] + norms[3:]) / 3
        else:
            assert min(norms) > 0.5 * sorted(norms)[1], norms    # no class stands out without the backdoor
    again = nc.reverse_engineer(RowModel(), xu, 2, c)              # deterministic, whatever was scanned before
    assert torch.equal(again["mask"], nc.reverse_engineer(RowModel(), xu, 2, c)["mask"])


# --- mitigation ---------------------------------------------------------------------------------------------------

def test_the_unlearning_set_replaces_a_seeded_share_by_stamped_copies_with_true_labels():
    x = torch.randint(0, 256, (2500, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(2500) % 10
    trig = [(torch.rand(4, 4), torch.rand(1, 4, 4)), (torch.rand(4, 4), torch.rand(1, 4, 4))]
    xs, ys, st = nc.unlearning_set(x, y, trig[:1], 0.2, generator(0, "split"))
    assert len(xs) == 2500 and int(st.sum()) == 500 and not st[:2000].any()
    perm = torch.randperm(2500, generator=generator(0, "split"))
    keep, out = perm[:2000], perm[2000:]
    assert torch.equal(xs[:2000], x[keep]) and torch.equal(ys[:2000], y[keep])     # the stamped originals are absent
    assert torch.equal(ys[2000:], y[out]) and torch.equal(xs[2000:], nc.stamp_uint8(x[out], *trig[0]))
    xs2, ys2, st2 = nc.unlearning_set(x, y, trig, 0.2, generator(0, "split"))
    assert len(xs2) == 3000 and int(st2.sum()) == 1000 and torch.equal(ys2[2500:], y[out])


def test_the_pruning_order_puts_the_most_excited_channel_first_and_ties_to_the_lower_index():
    assert nc.channel_order(torch.tensor([0.1, 0.5, 0.5, -1.0, 0.2])).tolist() == [1, 2, 4, 0, 3]
    m = build_model("cnn", 10, 1, (0.5,), (0.5,), 2)
    cols = nc.head_columns(m, 8, [1, 7])
    assert cols.sum() == 8 and cols[4:8].all() and cols[28:32].all() and not cols[:4].any()


# --- a run on the tiny record -------------------------------------------------------------------------------------

def run_nc(record, *extra):
    return nc.main(["--result_file", str(record), "--ratio", "0.1", "--nc_batch_size", "32", "--batches_per_epoch",
                    "1", "--nc_epoch", "2", "--epochs", "2", "--batch_size", "32", "--eval_batch_size", "256",
                    "--amp", "false", "--channels_last", "false", *extra])


def test_a_run_writes_the_detection_mitigates_and_resumes_at_the_next_class(tiny_record, monkeypatch):
    s = run_nc(tiny_record, "--force_mitigation", "true")
    out = Path(tiny_record) / "defense" / "nc"
    for f in ("trigger_recovered.png", "nc_classes.csv", "nc_log.csv", "triggers.safetensors", "metrics.csv",
              "model.pt", "index.txt"):
        assert (out / f).exists(), f
    rows = list(csv.DictReader((out / "nc_classes.csv").open()))
    assert [int(r["class"]) for r in rows] == list(range(10)) and sum(int(r["is_target"]) for r in rows) == 1
    assert s["nc_max_anomaly_index"] == max(s["anomaly_index"]) and s["nc_model_flagged"] == bool(s["nc_flagged_classes"])
    assert s["nc_target_anomaly_index"] == s["anomaly_index"][0] and s["true_target"] == 0   # the fixture's target
    assert s["mitigated"] and s["n_unlearn_stamped"] == 12 and "nc_class_auroc" in s
    attacked, _ = load_model_file(Path(tiny_record) / "model.pt")
    model, _ = load_model_file(out / "model.pt")
    assert any(not torch.equal(a, b) for a, b in zip(attacked.state_dict().values(), model.state_dict().values()))

    # killed after class 5's files were written but before its checkpoint: the resumed run searches classes 5-9
    # only, replaces the stale class 5, and ends with the same result
    from utils.run_folder import Run
    original = Run.save_checkpoint

    def die(self, epoch, state, phase=0):
        if phase == 0 and epoch == 6:
            raise KeyboardInterrupt
        original(self, epoch, state, phase)
    import shutil
    shutil.rmtree(out)
    monkeypatch.setattr(Run, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        run_nc(tiny_record, "--force_mitigation", "true")
    monkeypatch.setattr(Run, "save_checkpoint", original)
    searched, search = [], nc.reverse_engineer
    monkeypatch.setattr(nc, "reverse_engineer", lambda m, x, k, *a: searched.append(k) or search(m, x, k, *a))
    r = run_nc(tiny_record, "--force_mitigation", "true", "--resume")
    assert searched == [5, 6, 7, 8, 9] and r["l1_norms"] == s["l1_norms"] and r["test_asr"] == s["test_asr"]
    assert len(json.loads((out / "nc_classes.json").read_text())["classes"]) == 10
    again, _ = load_model_file(out / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_nothing_flagged_leaves_the_model_unchanged_and_pruning_zeroes_head_columns(tiny_record, monkeypatch):
    s = run_nc(tiny_record, "--anomaly_threshold", "inf", "--overwrite")
    out = Path(tiny_record) / "defense" / "nc"
    attacked, _ = load_model_file(Path(tiny_record) / "model.pt")
    model, _ = load_model_file(out / "model.pt")
    assert not s["mitigated"] and not s["nc_model_flagged"] and s["nc_flagged_classes"] == []
    assert all(torch.equal(a, b) for a, b in zip(attacked.state_dict().values(), model.state_dict().values()))
    assert s["test_asr"] == s["attack_test_asr"] and "the model is left unchanged" in (out / "log.txt").read_text()
    # the tiny model sends everything to class 0: pruning against class 0's recovered trigger has work to do
    verdict = nc.verdict
    monkeypatch.setattr(nc, "verdict", lambda *a: {**verdict(*a), "treat": [0]})
    p = run_nc(tiny_record, "--mitigation", "pruning", "--prune_finetune_epochs", "1", "--prune_stop_asr", "0.5")
    pruned = json.loads((Path(tiny_record) / "defense" / "nc-prune" / "pruned.json").read_text())
    model, _ = load_model_file(Path(tiny_record) / "defense" / "nc-prune" / "model.pt")
    cols = nc.head_columns(model, pruned["channels"], pruned["pruned_channels"])
    assert p["pruned_channels"] == pruned["pruned_channels"] and len(pruned["pruned_channels"]) > 0
    assert (model.head.weight[:, cols] == 0).all() and (model.head.weight[:, ~cols] != 0).any()
