"""ABL (docs/specs/abl.md §9): the LGA objective against hand computations (the sign flip below gamma, Flooding's
updates), the isolation count and order on hand numbers, the detection figures and files of the isolation, eval-mode
scoring, Cutout, the continued-training schedule, unlearning ascends, and the run on the tiny record: its files and
phases, resume equal to an uninterrupted run without a second scoring, the configuration's checks."""
import csv
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defense.abl as abl
from models import build_model
from utils.config import CONFIG_DIR
from utils.engine.augment import cutout_keep
from utils.engine.device import Precision
from utils.errors import UserError
from utils.run_folder import Run

FP32 = Precision(torch.device("cpu"), amp=False, channels_last=False)


def grads(objective, model, x, y):
    model.zero_grad()
    loss, _, _ = objective(F.cross_entropy(model(x), y, reduction="none"))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


# --- the objectives ---------------------------------------------------------------------------------------------------

def test_batch_lga_flips_the_sign_below_gamma_and_equals_flooding_in_its_updates():
    per = torch.tensor([0.1, 0.5], requires_grad=True)                  # CE_B = 0.3 < gamma
    loss, ascended, units = abl.lga(per, 0.5)
    loss.backward()
    assert loss.item() == pytest.approx(-0.3) and ascended.item() == 1 and units == 1
    assert torch.allclose(per.grad, torch.tensor([-0.5, -0.5]))       # -grad CE_B
    assert abl.lga(torch.tensor([0.6, 1.0]), 0.5)[0].item() == pytest.approx(0.8)   # above: plain descent
    torch.manual_seed(0)
    model, x = nn.Linear(4, 3), torch.randn(6, 4)
    y = torch.randint(0, 3, (6,))
    flooding = lambda gamma: lambda p: ((p.mean() - gamma).abs() + gamma, None, 0)   # BackdoorBench's default
    for gamma in (0.05, 5.0):                                           # below and above the threshold
        _, g1 = grads(lambda p: abl.lga(p, gamma), model, x, y)
        _, g2 = grads(flooding(gamma), model, x, y)
        _, g0 = grads(abl.descent, model, x, y)
        sign = 1 if gamma < 1 else -1                                   # CE of a random 3-class model is about 1.1
        assert all(torch.allclose(a, b) and torch.allclose(a, sign * c) for a, b, c in zip(g1, g2, g0))
    ce = F.cross_entropy(model(x), y, reduction="none").mean().item()      # exactly at gamma: no gradient at all
    _, g = grads(lambda p: abl.lga(p, ce), model, x, y)
    assert all((t.abs() < 1e-6).all() for t in g)


def test_sample_lga_signs_each_sample():
    per = torch.tensor([0.2, 0.9])
    loss, ascended, units = abl.lga(per, 0.5, per_sample=True)
    assert loss.item() == pytest.approx(0.35) and ascended.item() == 1 and units == 2   # (-0.2 + 0.9) / 2
    assert abl.lga(per, 0.5)[0].item() == pytest.approx(0.55)


# --- isolation: count, order, files, detection figures -------------------------------------------------------------

@pytest.mark.parametrize("n,ratio,k", [(50000, 0.01, 500), (39209, 0.01, 392), (100000, 0.01, 1000),
                                       (60000, 0.01, 600), (100, 0.29, 28)])
def test_isolation_count_truncates(n, ratio, k):
    assert abl.isolation_count(n, ratio) == k


def test_isolating_none_or_all_is_refused():
    with pytest.raises(UserError, match=r"0\.001 of N = 100 .* isolates 0: none"):
        abl.isolation_count(100, 0.001)
    with pytest.raises(UserError, match=r"N = 10 .* all of them"):
        abl.isolation_count(10, 1.0)        # the option itself refuses ratio 1


def test_order_ranks_files_and_detection_figures_by_hand():
    losses = torch.tensor([0.1, 0.0, 0.0, 0.3, 0.0], dtype=torch.float64)
    order, rank = abl.isolation_order(losses)
    assert order.tolist() == [1, 2, 4, 0, 3] and rank.tolist() == [3, 0, 1, 4, 2]   # ties: lower index first
    files = {}
    run = SimpleNamespace(write_file=lambda name, text: files.__setitem__(name, text))
    s = abl.TrainSet(torch.tensor([3, 5, 7, 8, 9]), torch.zeros(5, 1, 2, 2, dtype=torch.uint8),
                     torch.tensor([0, 0, 0, 1, 2]), torch.tensor([1, 0, 2, 1, 2]), torch.tensor([1, 0, 1, 0, 0]).bool())
    abl.write_isolation(run, s, losses, rank, order, 2)
    assert files["isolated.txt"] == "5\n7\n"                            # training indices in rank order
    lines = files["detection_scores.csv"].splitlines()
    assert lines[0] == "score,label,flagged" and len(lines) == 6
    assert [ln.split(",")[2] for ln in lines[1:]] == ["0", "1", "1", "0", "0"]
    assert [float(ln.split(",")[0]) for ln in lines[1:]] == [-0.1, 0.0, 0.0, -0.3, 0.0]
    assert [ln.split(",")[1] for ln in lines[1:]] == ["1", "0", "1", "0", "0"]
    r = abl.isolation_report(losses, order, 2, s.poisoned, pratio=0.6)
    # flags {1, 2}, positives {0, 2}: precision 1/2, recall 1/2, FPR 1/3
    assert (r["det_flagged"], r["det_precision"], r["det_recall"]) == (2, 0.5, 0.5)
    assert r["det_fpr"] == pytest.approx(1 / 3) and r["isolated_poisoned"] == 1
    # AUROC of s = -loss: positives -0.1, 0 against negatives 0, -0.3, 0: pairs (0 + 1 + 0 + 0.5 + 1 + 0.5) / 6
    assert r["det_auroc"] == pytest.approx(3 / 6)
    assert r["isolation_loss_threshold"] == 0.0
    assert r["oracle_count"] == 3 and r["precision_at_pratio"] == pytest.approx(1 / 3)   # lowest 3: {1, 2, 4}


def test_scoring_is_batched_eval_mode_fp32_and_leaves_the_model_alone():
    torch.manual_seed(0)
    m = build_model("cnn", 10, 1, (0.5,), (0.5,), 2)
    m.train()
    with torch.no_grad():      # BN statistics away from their initial values
        m(torch.rand(16, 1, 28, 28))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (7,))
    amp = Precision(torch.device("cpu"), amp=True, channels_last=False)
    got = abl.sample_losses(m, x, y, amp, batch_size=3)
    m.eval()
    with torch.no_grad():
        one = torch.cat([F.cross_entropy(m(x[i:i + 1].float() / 255).double(), y[i:i + 1], reduction="none")
                         for i in range(7)])
    assert got.dtype == torch.float64 and torch.allclose(got, one, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert abl.sample_losses(m, x, y, FP32, 4, torch.float32).dtype == torch.float32


# --- augmentation, schedule, unlearning ----------------------------------------------------------------------------

def test_cutout_of_length_3_zeroes_a_2x2_square_inside_and_a_1x2_strip_at_the_top():
    keep = cutout_keep(5, 5, torch.tensor([2, 0]), torch.tensor([2, 2]), 3)
    assert (~keep[0]).nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert (~keep[1]).nonzero().tolist() == [[0, 1], [0, 2]]


def test_continued_training_lr_steps_after_the_milestone():
    cfg = {"lr_finetuning": 0.01, "finetuning_lr_gamma": 0.1, "finetuning_milestones": [40]}
    lrs = [abl.finetune_lr(e, cfg) for e in range(1, 61)]
    assert set(lrs[:40]) == {0.01} and all(v == pytest.approx(0.001) for v in lrs[40:])
    assert abl.milestones("40,60") == [40, 60] and abl.milestones(2) == [2]
    with pytest.raises(ValueError):
        abl.milestones("forty")


def test_an_unlearning_step_ascends_the_isolated_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    s = abl.TrainSet(torch.arange(8), torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8),
                     torch.randint(0, 3, (8,)), torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.bool))
    x = s.x.float() / 255
    theta = [p.detach().clone() for p in model.parameters()]
    ce0 = F.cross_entropy(model(x), s.y)
    g = torch.autograd.grad(ce0, list(model.parameters()))
    opt = abl.make_sgd(model.parameters(), {"lr": 0.5, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False})
    stats = abl.run_epoch(model, s, [torch.arange(8)], None, opt, FP32, abl.ascent, "test")
    assert stats["n_train"] == 8
    assert stats["train_ce"] == pytest.approx(ce0.item()) and stats["train_loss"] == pytest.approx(-ce0.item())
    assert all(torch.allclose(p, t + 0.5 * gi) for p, t, gi in zip(model.parameters(), theta, g))
    assert F.cross_entropy(model(x), s.y).item() > ce0.item() + 1e-3
    assert stats["train_poisoned_fraction"] == 1.0 and stats["train_asr_bd_only"] == stats["train_acc"]


# --- the run on the tiny record --------------------------------------------------------------------------------------

ARGS = ["--tuning_epochs", "2", "--finetuning_epochs", "1", "--unlearning_epochs", "2", "--batch_size", "64",
        "--isolation_ratio", "0.05", "--eval_batch_size", "256", "--device", "cpu", "--amp", "false",
        "--channels_last", "false"]


def copy_record(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("defense"))
    return dst


def read_rows(out):
    with open(out / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


def weights(out):
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_record, tmp_path_factory):
    rec = copy_record(tiny_record, tmp_path_factory.mktemp("abl") / "rec")
    return abl.main(["--result_file", str(rec), *ARGS]), rec / "defense" / "abl"


def test_a_run_isolates_finetunes_unlearns_and_reports_the_detection(uninterrupted):
    s, out = uninterrupted
    for f in ("config.yaml", "model.pt", "metrics.csv", "summary.json", "curves.png", "isolated.txt",
              "detection_scores.csv"):
        assert (out / f).exists(), f
    assert not (out / "checkpoint.pt").exists()
    rows = read_rows(out)
    assert [r["phase"] for r in rows] == ["isolation"] * 2 + ["select", "finetune"] + ["unlearn"] * 2
    assert [int(r["abl_epoch"]) for r in rows] == [1, 2, 2, 3, 4, 5]
    n, n_iso = 600, 30
    assert int(rows[0]["n_train"]) == n and int(rows[3]["n_train"]) == n - n_iso and int(rows[4]["n_train"]) == n_iso
    assert rows[2]["test_acc"] == ""                                   # select: no test evaluation
    # unlearning logs the positive CE on I, which rises
    assert float(rows[5]["train_loss"]) == float(rows[5]["train_ce"]) > float(rows[4]["train_ce"])
    lines = (out / "detection_scores.csv").read_text().splitlines()
    assert lines[0] == "score,label,flagged" and len(lines) == n + 1
    flagged = [int(ln.split(",")[2]) for ln in lines[1:]]
    isolated = [int(w) for w in (out / "isolated.txt").read_text().split()]
    assert sum(flagged) == n_iso == s["n_isolated"] == s["det_flagged"] == len(isolated) == len(set(isolated))
    labels = [int(ln.split(",")[1]) for ln in lines[1:]]
    hits = sum(f and lab for f, lab in zip(flagged, labels))
    assert s["isolated_poisoned"] == hits and s["det_precision"] == pytest.approx(hits / n_iso)
    assert s["det_recall"] == pytest.approx(hits / sum(labels)) and 0 <= s["det_auroc"] <= 1
    for k in ("det_tpr_at_fpr_0.01", "det_tpr_at_fpr_0.05", "det_fpr", "isolation_test_acc", "finetune_test_asr",
              "test_acc", "test_asr", "der", "unlearn_seconds"):
        assert k in s, k
    assert sum(s["isolated_label_hist"]) == n_iso and s["n_poisoned"] == sum(labels) > 0


def test_resume_equals_an_uninterrupted_run(uninterrupted, tiny_record, tmp_path, monkeypatch):
    """Stopped in isolation, resumed and stopped right after select, resumed and stopped in unlearning, resumed."""
    _, out_a = uninterrupted
    rec = copy_record(tiny_record, tmp_path / "rec")
    original, stops = Run.save_checkpoint, [(0, 1), (1, 1), (3, 1)]      # (phase, epochs done in it)

    def die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        if stops and (phase, epoch) == stops[0]:
            stops.pop(0)
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        abl.main(["--result_file", str(rec), *ARGS])
    with pytest.raises(KeyboardInterrupt):
        abl.main(["--result_file", str(rec), *ARGS, "--resume"])
    # isolation and selection are done: scoring must not run again
    monkeypatch.setattr(abl, "sample_losses", lambda *a: pytest.fail("a resumed run scored again"))
    with pytest.raises(KeyboardInterrupt):
        abl.main(["--result_file", str(rec), *ARGS, "--resume"])
    abl.main(["--result_file", str(rec), *ARGS, "--resume"])
    out_b = rec / "defense" / "abl"
    wa, wb = weights(out_a), weights(out_b)
    assert not stops and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_rows(out_a) == read_rows(out_b)
    for f in ("isolated.txt", "detection_scores.csv"):
        assert (out_a / f).read_bytes() == (out_b / f).read_bytes(), f


def test_configuration_checks(tmp_path):
    base = ["--result_file", str(tmp_path / "none")]
    cfg, args = abl.configure(base, dataset="fashion_mnist")
    assert cfg["tuning_epochs"] == 2 and cfg["lr_unlearning"] == 5e-4 and args.deviations == []   # the spec's column
    authors = str(CONFIG_DIR / "defense" / "abl" / "authors_cifar10.yaml")
    cfg, args = abl.configure(base + ["--yaml_path", authors], dataset="cifar10")
    assert cfg["cutout_length"] == 3 and "cutout_length = 3 (spec: 0)" in args.deviations
    with pytest.raises(UserError, match="lr_finetuning"):
        abl.configure(base + ["--lr_finetuning_init", "0.1"], dataset="cifar10")
    for bad in (["--lga_reduction", "mean"], ["--isolation_ratio", "1"], ["--gamma", "-1"], ["--momentum", "0"],
                ["--finetuning_milestones", "forty"]):
        with pytest.raises(UserError):
            abl.configure(base + bad, dataset="cifar10")
