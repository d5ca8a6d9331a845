"""The fine-tuning family (defense/ft.py, defense/fst.py): docs/specs/ft_family.md §10."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from defense import fst as fst_entry
from defense import ft
from models import build_model
from tests.conftest import REPO, make_record
from utils.defense import defense_config
from utils.engine.device import Precision
from utils.errors import UserError
from utils.record import load_attack_record
from utils.seeding import generator

FP32 = Precision(torch.device("cpu"), amp=False, channels_last=False)


def cfg_for(mode, **kw):
    cfg = {o.name: o.default for o in ft.OPTIONS}
    cfg.update(ft_mode=mode, random_seed=0, **kw)
    return cfg


def small_model(seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", 10, 1, (0.5,), (0.5,), 4)


def data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def backbone_state(model):
    return [p.detach().clone() for p in model.backbone_parameters()]


def tune_steps(mode, steps=3, **kw):
    model = small_model()
    before = {"backbone": backbone_state(model), "head_w": model.head.weight.detach().clone(),
              "head_b": model.head.bias.detach().clone(), "bn": bn_stats(model)}
    tuner = ft.Tuner(model, cfg_for(mode, **kw), FP32)
    after_init = {"head_w": model.head.weight.detach().clone(), "head_b": model.head.bias.detach().clone()}
    x, y = data()
    norms = []
    tuner.train_mode()
    for _ in range(steps):
        tuner.step(x, y)
        norms.append(model.head.weight.norm().item())
    return model, tuner, before, after_init, norms


def same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


def all_differ(a, b):
    return all(not torch.equal(u, v) for u, v in zip(a, b))


# --- which parameters change, per mode ------------------------------------------------------------------------

def test_lp_changes_only_the_head_and_bn_statistics():
    model, tuner, before, _, _ = tune_steps("lp")
    assert same(backbone_state(model), before["backbone"])
    assert not torch.equal(model.head.weight, before["head_w"]) and not torch.equal(model.head.bias, before["head_b"])
    assert all(not torch.equal(v, before["bn"][k]) for k, v in bn_stats(model).items() if "running_mean" in k)
    assert {id(p) for p in tuner.params} == {id(p) for p in model.head_parameters()}


def test_lp_with_freeze_bn_stats_keeps_bn_statistics():
    model, _, before, _, _ = tune_steps("lp", freeze_bn_stats=True)
    assert all(torch.equal(v, before["bn"][k]) for k, v in bn_stats(model).items())
    assert same(backbone_state(model), before["backbone"])


def test_fe_tuning_keeps_the_reinitialised_head_rescaled_to_c():
    model, tuner, before, init, _ = tune_steps("fe-tuning")
    c = before["head_w"].norm()
    assert not torch.equal(init["head_w"], before["head_w"])
    torch.testing.assert_close(model.head.weight, init["head_w"] * c / init["head_w"].norm())
    assert torch.equal(model.head.bias, init["head_b"])           # the bias is never rescaled
    assert all_differ(backbone_state(model), before["backbone"])
    assert {id(p) for p in tuner.params} == {id(p) for p in model.backbone_parameters()}


@pytest.mark.parametrize("mode", ["ft", "ft-init", "fst"])
def test_full_modes_change_everything(mode):
    model, tuner, before, init, _ = tune_steps(mode)
    assert all_differ(backbone_state(model), before["backbone"])
    assert not torch.equal(model.head.weight, init["head_w"]) and not torch.equal(model.head.bias, init["head_b"])
    assert len(tuner.params) == len(list(model.parameters()))
    assert (mode == "ft") == torch.equal(init["head_w"], before["head_w"])   # only ft and lp keep the old head


# --- head re-initialisation --------------------------------------------------------------------------------

def test_reinit_range_and_reproducibility():
    model = small_model()
    old = model.head.weight.detach().clone()
    ft.reinit_head(model.head, generator(0, "head_reinit"))
    w1, b1 = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    bound = 1 / math.sqrt(model.feature_dim)
    assert w1.abs().max() <= bound and b1.abs().max() <= bound
    assert w1.abs().max() > 0.8 * bound                         # spread over the whole range, not a tiny init
    assert not torch.equal(w1, old)
    ft.reinit_head(model.head, generator(0, "head_reinit"))
    assert torch.equal(model.head.weight, w1) and torch.equal(model.head.bias, b1)
    ft.reinit_head(model.head, generator(1, "head_reinit"))
    assert not torch.equal(model.head.weight, w1)


def test_reinit_rescale_sets_norm_at_once():
    model = small_model()
    c = model.head.weight.norm().item()
    ft.Tuner(model, cfg_for("fst", reinit_rescale=True), FP32)
    assert model.head.weight.norm().item() == pytest.approx(c, rel=1e-5)
    model = small_model()
    ft.Tuner(model, cfg_for("fst"), FP32)                        # default: the random head is used as drawn
    ref = small_model()
    ft.reinit_head(ref.head, generator(0, "head_reinit"))
    assert torch.equal(model.head.weight, ref.head.weight)
    assert model.head.weight.norm().item() != pytest.approx(c, rel=1e-3)


# --- the FST regulariser --------------------------------------------------------------------------------------

def test_regulariser_value_and_gradient_on_a_hand_made_head():
    w_ori = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    w = torch.tensor([[2.0, 1.0, -4.0], [1.0, -1.0, 2.0]], requires_grad=True)
    # sum w * w_ori = 2 - 2 - 2 + 0 - 3 - 2 = -7
    assert ft.fst_penalty(w, w_ori, 1.0).item() == pytest.approx(-7.0)
    reg = ft.fst_penalty(w, w_ori, 0.2)
    assert reg.item() == pytest.approx(-1.4)
    reg.backward()
    torch.testing.assert_close(w.grad, 0.2 * w_ori)


def test_label_smoothing_keeps_the_fst_term():
    logits, y = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    w, w_ori = torch.randn(3, 5), torch.randn(3, 5)
    total, ce, reg = ft.tuning_loss(logits, y, w, w_ori, "fst", 0.2, 0.1)
    torch.testing.assert_close(ce, ft.smoothed_cross_entropy(logits, y, 0.1))
    torch.testing.assert_close(reg, 0.2 * (w * w_ori).sum())
    torch.testing.assert_close(total, ce + reg)
    assert reg.abs() > 0
    total, ce, reg = ft.tuning_loss(logits, y, w, w_ori, "ft-init", 0.2, None)
    assert reg.item() == 0 and torch.equal(total, ce)


def test_label_smoothing_is_the_fst_originals_form():
    """1 - eps on the true class, eps / (K - 1) on the others (spec §6, defect 10), by hand."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y, eps, k = torch.tensor([0, 2]), 0.3, 3
    by_hand = []
    for row, t in zip(logits.tolist(), y.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        logp = [v - log_z for v in row]
        by_hand.append(-sum(((1 - eps) if j == t else eps / (k - 1)) * logp[j] for j in range(k)))
    expected = sum(by_hand) / len(by_hand)
    _, ce, _ = ft.tuning_loss(logits, y, torch.zeros(3, 2), torch.zeros(3, 2), "ft", 0.2, eps)
    assert ce.item() == pytest.approx(expected, rel=1e-6)
    builtin = F.cross_entropy(logits, y, label_smoothing=eps).item()       # eps / K everywhere, + 1 - eps on y
    assert abs(builtin - expected) > 1e-2
    # the same targets as the built-in form with eps' = eps * K / (K - 1)
    assert F.cross_entropy(logits, y, label_smoothing=eps * k / (k - 1)).item() == pytest.approx(expected, rel=1e-6)
    assert ft.smoothed_cross_entropy(logits.half(), y, eps).dtype == torch.float32


def test_no_label_smoothing_is_plain_cross_entropy_bit_for_bit():
    logits, y = torch.randn(16, 10, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 10
    for off in (None, 0.0):
        _, ce, _ = ft.tuning_loss(logits, y, torch.zeros(10, 2), torch.zeros(10, 2), "ft", 0.2, off)
        assert torch.equal(ce, F.cross_entropy(logits.float(), y))


# --- head-norm projection ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ft.MODES)
def test_head_norm_equals_c_after_every_step(mode):
    model, tuner, before, _, norms = tune_steps(mode, steps=4)
    c = before["head_w"].norm().item()
    assert tuner.norm == pytest.approx(c)
    assert norms == pytest.approx([c] * 4, rel=1e-5)


def test_projection_off_lets_the_norm_drift():
    _, tuner, _, _, norms = tune_steps("fst", steps=4, project_head_norm=False)
    assert all(abs(n - tuner.norm) > 1e-3 * tuner.norm for n in norms)
    _, tuner, _, _, norms = tune_steps("ft", steps=4, project_head_norm=False, lr=0.1)
    assert abs(norms[-1] - tuner.norm) > 1e-4 * tuner.norm


def test_projection_leaves_the_bias_alone():
    head = torch.nn.Linear(4, 3)
    b = head.bias.detach().clone()
    ft.project_head_norm_(head, 5.0)
    assert head.weight.norm().item() == pytest.approx(5.0) and torch.equal(head.bias, b)


# --- the BackdoorBench FT configuration -------------------------------------------------------------------------

NO_TRAINING_WARNING = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no steps


@NO_TRAINING_WARNING
def test_backdoorbench_config_keeps_t_max_100(tiny_record):
    """The cosine datasets (cifar10, cifar100, gtsrb and our mnist copies): T_max 100 whatever the epochs."""
    yaml_path = REPO / "config/defense/ft/backdoorbench_fashion_mnist.yaml"
    cfg, _ = defense_config("ft", ft.OPTIONS, ["--result_file", str(tiny_record), "--yaml_path", str(yaml_path),
                                               "--epochs", "200"], config_dir="ft")
    assert (cfg["ft_mode"], cfg["out_name"], cfg["cos_t_max"], cfg["batch_size"]) == ("ft", "ft-bb", 100, 256)
    assert cfg["lr_scheduler"] == "CosineAnnealingLR"
    assert (cfg["weight_decay"], cfg["split_ratio"], cfg["balanced"], cfg["project_head_norm"]) == (5e-4, 0.05, False, False)
    tuner = ft.Tuner(small_model(), cfg, FP32)
    lrs = []
    for _ in range(200):
        lrs.append(tuner.optimizer.param_groups[0]["lr"])
        tuner.scheduler.step()
    assert lrs[100] == pytest.approx(0.0, abs=1e-9)                # bottom of the cosine at epoch 101
    assert lrs[199] == pytest.approx(0.01, rel=1e-3)               # lr at epoch 200 is back near 0.01


def bb_config(dataset, *extra):
    """BackdoorBench's yaml for `dataset`, resolved as a sweep checks a job whose attack record does not exist yet."""
    yaml_path = REPO / f"config/defense/ft/backdoorbench_{dataset}.yaml"
    return defense_config("ft", ft.OPTIONS, ["--result_file", "no_such_record_ft_bb", "--yaml_path", str(yaml_path),
                                             *extra], config_dir="ft", spec_for=ft.spec_for, dataset=dataset)


def test_backdoorbench_tiny_uses_reduce_lr_on_plateau():
    """BackdoorBench's config/defense/ft/tiny.yaml: ReduceLROnPlateau (torch's factor 0.1, patience 10), 200 epochs."""
    cfg, args = bb_config("tiny")
    assert (cfg["epochs"], cfg["lr_scheduler"], cfg["plateau_factor"], cfg["plateau_patience"]) == \
        (200, "ReduceLROnPlateau", 0.1, 10)
    assert args.deviations == []
    sched = ft.Tuner(small_model(), cfg, FP32).scheduler
    assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (sched.mode, sched.factor, sched.patience) == ("min", 0.1, 10)
    _, args = bb_config("tiny", "--lr_scheduler", "CosineAnnealingLR", "--cos_t_max", "100")
    assert any(d.startswith("lr_scheduler = 'CosineAnnealingLR'") for d in args.deviations), args.deviations
    _, args = bb_config("gtsrb")                                          # cosine stays the spec elsewhere
    assert args.deviations == []
    _, args = bb_config("gtsrb", "--lr_scheduler", "ReduceLROnPlateau")
    assert any(d.startswith("lr_scheduler = 'ReduceLROnPlateau'") for d in args.deviations), args.deviations


@NO_TRAINING_WARNING
def test_plateau_cuts_lr_after_patience_epochs_without_improvement():
    """A synthetic run whose training loss cannot improve (lr 1e-7): the lr is cut once `patience` epochs have
    passed without improvement after the best one, and not before."""
    x, y = data(n=32)
    cfg = cfg_for("ft", lr=1e-7, lr_scheduler="ReduceLROnPlateau", plateau_patience=2, plateau_factor=0.5,
                  batch_size=32, project_head_norm=False)
    tuner = ft.Tuner(small_model(), cfg, FP32)
    rows = [tuner.epoch(x.mul(255).to(torch.uint8), y, generator(0, "shuffle"), lambda b: b) for _ in range(6)]
    losses = [r["train_loss"] for r in rows]
    assert max(losses) - min(losses) < 1e-5 * losses[0]                   # no improvement beyond the threshold
    # epoch 1 sets the best; epochs 2-4 are 3 > patience bad ones, so the lr is cut after epoch 4
    assert [r["lr"] for r in rows] == pytest.approx([1e-7] * 4 + [5e-8] * 2, rel=1e-9)
    # an improving loss never cuts; cosine ignores the loss
    tuner = ft.Tuner(small_model(), cfg, FP32)
    for i in range(10):
        tuner.scheduler_step(1.0 - 0.1 * i)
    assert tuner.optimizer.param_groups[0]["lr"] == 1e-7
    cos = ft.Tuner(small_model(), cfg_for("ft", epochs=4), FP32)
    cos.scheduler_step(123.0)
    assert cos.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 + math.cos(math.pi / 4)) / 2)


def test_plateau_resume_equals_an_uninterrupted_run(tiny_record, monkeypatch):
    """A loss that cannot improve (lr 1e-7, one batch, no augmentation, fp32) and patience 0: the cut after epoch 2
    needs the best loss of epoch 1, so it happens only if the plateau's state crosses the interruption."""
    args = ["--result_file", str(tiny_record), "--ft_mode", "ft", "--epochs", "3", "--split_ratio", "0.1",
            "--batch_size", "64", "--lr", "1e-7", "--crop_padding", "0", "--hflip", "false", "--amp", "false",
            "--lr_scheduler", "ReduceLROnPlateau", "--plateau_patience", "0", "--plateau_factor", "0.5",
            "--out_name", "ft-plateau", "--overwrite"]
    full = ft.main(args)
    out = Path(tiny_record) / "defense" / "ft-plateau"
    w_full = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    lr_full = (out / "metrics.csv").read_text().splitlines()
    real_fit = ft.fit

    def stop_after_one(run, phase, state):
        import dataclasses
        real_fit(run, dataclasses.replace(phase, epochs=1), state)
        raise KeyboardInterrupt
    shutil.rmtree(out)
    monkeypatch.setattr(ft, "fit", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        ft.main(args[:-1])
    ck = torch.load(out / "checkpoint.pt", weights_only=False)["state"]["scheduler"]
    assert math.isfinite(ck["best"])                                      # the plateau's memory is checkpointed
    monkeypatch.setattr(ft, "fit", real_fit)
    resumed = ft.main(args[:-1] + ["--resume"])
    w_res = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert resumed["test_acc"] == full["test_acc"] and resumed["test_asr"] == full["test_asr"]
    col = lambda lines: [float(line.split(",")[lines[0].split(",").index("lr")]) for line in lines[1:]]
    assert col(lr_full) == pytest.approx([1e-7, 1e-7, 5e-8], rel=1e-9)
    assert col((out / "metrics.csv").read_text().splitlines()) == col(lr_full)


# --- whole runs on records ------------------------------------------------------------------------------------

def run_ft(record, mode, *extra, entry=None):
    argv = ["--result_file", str(record), "--epochs", "1", "--split_ratio", "0.1", "--batch_size", "32", *extra]
    return (entry or ft.main)(argv + ([] if entry else ["--ft_mode", mode]))


def read_index(path):
    return torch.tensor([int(s) for s in Path(path).read_text().split()])


def test_runs_write_complete_records(tiny_record):
    s = run_ft(tiny_record, "lp", "--overwrite")
    out = Path(tiny_record) / "defense" / "lp"
    for f in ("config.yaml", "model.pt", "metrics.csv", "summary.json", "curves.png", "log.txt", "index.txt"):
        assert (out / f).exists(), f
    assert not (out / "checkpoint.pt").exists()
    for k in ("test_acc", "test_asr", "test_ra", "attack_test_acc", "attack_test_asr", "attack_test_ra", "der", "rir"):
        assert k in s
    assert s["ft_mode"] == "lp" and s["defense"] == "lp"
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    for k in ("epoch", "lr", "seconds", "train_loss", "train_ce", "train_acc", "head_norm", "head_cos",
              "clean_test_loss", "bd_test_loss", "test_acc", "test_asr", "test_ra"):
        assert k in header
    # lp keeps the attacked backbone bit for bit (the attacked model.pt against the defended one)
    a = torch.load(Path(tiny_record) / "model.pt", weights_only=True)["state_dict"]
    d = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], d[k]) for k in a if "weight" in k and not k.startswith("head") and "running" not in k)
    with pytest.raises(UserError, match="already exists"):
        run_ft(tiny_record, "lp")


def test_fst_entry_point_and_regulariser_column(tiny_record):
    s = run_ft(tiny_record, None, "--overwrite", entry=fst_entry.main)
    out = Path(tiny_record) / "defense" / "fst"
    assert s["ft_mode"] == "fst" and (out / "summary.json").exists()
    assert "train_reg" in (out / "metrics.csv").read_text().splitlines()[0]
    with pytest.raises(UserError, match="fst only"):
        fst_entry.main(["--result_file", str(tiny_record), "--ft_mode", "lp"])
    with pytest.raises(UserError, match="ft_mode is required"):
        ft.main(["--result_file", str(tiny_record)])


def test_backdoorbench_run_goes_to_ft_bb(tiny_record):
    yaml_path = REPO / "config/defense/ft/backdoorbench_fashion_mnist.yaml"
    s = ft.main(["--result_file", str(tiny_record), "--yaml_path", str(yaml_path), "--epochs", "1", "--overwrite"])
    out = Path(tiny_record) / "defense" / "ft-bb"
    assert s["defense"] == "ft-bb" and (out / "summary.json").exists()
    assert len(read_index(out / "index.txt")) == math.floor(600 * 0.05)     # uniform draw of floor(N * 0.05)


def test_clean_subset_balanced_unpoisoned_reproducible(tiny_record):
    poison = json.loads((Path(tiny_record) / "poison.json").read_text())
    run_ft(tiny_record, "ft", "--overwrite")
    idx = read_index(Path(tiny_record) / "defense" / "ft" / "index.txt")
    y = load_attack_record(tiny_record).data.y_train_true
    assert torch.bincount(y[idx], minlength=10).tolist() == [6] * 10       # floor(600 * 0.1 / 10) per class
    assert not set(idx.tolist()) & set(poison["poison_indices"])
    run_ft(tiny_record, "ft", "--overwrite")
    assert torch.equal(read_index(Path(tiny_record) / "defense" / "ft" / "index.txt"), idx)


def test_clean_subset_uses_the_reserve(tmp_path, fake_root):
    rec = tmp_path / "badnet_reserve"
    make_record(rec, fake_root, extra=["--reserve_ratio", "0.2"])
    reserve = set(json.loads((rec / "poison.json").read_text())["reserve_indices"])
    run_ft(rec, "ft-init")
    idx = read_index(rec / "defense" / "ft-init" / "index.txt")
    assert len(idx) == 60 and set(idx.tolist()) <= reserve
    cfg = yaml.safe_load((rec / "defense" / "ft-init" / "config.yaml").read_text())
    assert cfg["clean_subset"]["source"] == "reserve"


def test_a_short_real_fst_run_lowers_asr(real_badnet_record):
    s = run_ft(real_badnet_record, None, "--epochs", "6", "--batch_size", "64", entry=fst_entry.main)
    assert s["attack_test_asr"] > 0.9
    assert s["test_asr"] < 0.2
    assert s["test_acc"] > s["attack_test_acc"] - 0.15
