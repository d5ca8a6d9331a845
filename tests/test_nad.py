"""NAD (docs/specs/nad.md §9): attention maps and the AT loss against hand computations, the total loss, beta = 0 equal
to plain fine-tuning, stage resolution and its errors, a frozen teacher in eval mode, one student forward per step
seeing the teacher's batch, the learning-rate rules, a teacher from a file, resume equal to an uninterrupted run,
streams that do not depend on nad_epochs, and the configuration."""
import copy
import csv
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from defense import nad
from models import build_model
from utils.engine.device import Precision
from utils.engine.epoch import train_epoch_supervised
from utils.engine.optim import make_scheduler
from utils.errors import UserError
from utils.io import atomic_torch_save
from utils.model_file import load_model_file, model_payload
from utils.seeding import generator
from utils.stages import Recorder
from tests.conftest import REPO

FP32 = Precision(torch.device("cpu"), False, False)
CFG = {"lr": 0.01, "lr_mid": 0.01, "lr_late": 1e-4, "sgd_momentum": 0.9, "wd": 5e-4, "nesterov": False,
       "at_stages": ["layer2", "layer3", "layer4"], "betas": [500.0, 1000.0, 1000.0], "p": 2.0, "batch_size": 16}


def cnn(seed=0, width=4):
    torch.manual_seed(seed)
    return build_model("cnn", 10, 1, (0.5,), (0.5,), width)


def test_attention_map_and_at_loss_by_hand():
    s = torch.tensor([[[1., 0], [0, 1]], [[1, 1], [0, 0]]])[None]
    t = torch.tensor([[[0., 0], [0, 2]], [[0, 0], [0, 0]]])[None]
    r6 = math.sqrt(6)
    assert torch.allclose(nad.attention_map(s), torch.tensor([[2 / r6, 1 / r6, 0, 1 / r6]]), atol=1e-6)
    assert torch.allclose(nad.attention_map(t), torch.tensor([[0., 0, 0, 1]]), atol=1e-6)
    assert nad.at_loss(s, t).item() == pytest.approx(0.2958757, abs=2e-7)
    one = torch.tensor([[[[1., 2], [0, 0]]]])
    assert torch.allclose(nad.attention_map(one, 1.0), torch.tensor([[1., 2, 0, 0]]) / math.sqrt(5), atol=1e-6)
    assert torch.allclose(nad.attention_map(one, 2.0), torch.tensor([[1., 4, 0, 0]]) / math.sqrt(17), atol=1e-6)
    assert torch.equal(nad.attention_map(-one), nad.attention_map(one))


def test_at_properties():
    torch.manual_seed(0)
    f = torch.randn(3, 5, 4, 4, requires_grad=True)
    g = torch.randn(3, 5, 4, 4)
    loss = nad.at_loss(f, f.detach())
    loss.backward()
    assert loss.item() == 0 and (f.grad == 0).all()
    scale = torch.tensor([2.0, 0.5, 7.0]).view(3, 1, 1, 1)
    assert nad.at_loss(f * scale, g).item() == pytest.approx(nad.at_loss(f, g).item(), rel=1e-4)
    assert nad.at_loss(torch.cat([f, f]), torch.cat([g, g])).item() == pytest.approx(nad.at_loss(f, g).item(), rel=1e-6)
    # a 1x1 map normalises to ~1: BackdoorBench's pooled third term adds less than 1e-9 (spec §7 #1)
    p1, p2 = torch.rand(4, 8, 1, 1) + 1, torch.rand(4, 8, 1, 1) + 1
    assert 1000 * nad.at_loss(p1, p2).item() < 1e-9


def test_total_loss_is_ce_plus_weighted_at_terms():
    torch.manual_seed(0)
    logits, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    fs, ft = [torch.randn(4, 3, 5, 5), torch.randn(4, 2, 3, 3)], [torch.randn(4, 3, 5, 5), torch.randn(4, 2, 3, 3)]
    total, ce, ats = nad.nad_loss(logits, y, fs, ft, [500.0, 1000.0])
    want = F.cross_entropy(logits, y) + 500 * nad.at_loss(fs[0], ft[0]) + 1000 * nad.at_loss(fs[1], ft[1])
    assert total.item() == pytest.approx(want.item(), abs=1e-6) and ce.item() == pytest.approx(
        F.cross_entropy(logits, y).item()) and len(ats) == 2


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def test_beta_zero_is_plain_fine_tuning_bitwise():
    x, y = data()
    s1, teacher = cnn(0), cnn(1).eval()
    s2 = copy.deepcopy(s1)
    opt1, opt2 = nad.make_sgd(s1.parameters(), CFG), nad.make_sgd(s2.parameters(), CFG)
    g1, g2, a1, a2 = (generator(0, k) for k in ("s", "s", "a", "a"))
    nad.nad_epoch(s1, teacher, x, y, opt1, FP32, g1, nad.make_augment(a1, 4, False, 0), CFG["at_stages"],
                  [0.0, 0.0, 0.0], 2.0, 10)
    train_epoch_supervised(s2, x, y, opt2, FP32, g2, 10, False, nad.make_augment(a2, 4, False, 0))
    assert all(torch.equal(a, b) for a, b in zip(s1.state_dict().values(), s2.state_dict().values()))


@pytest.mark.parametrize("name,c_in,size,shapes", [
    ("cnn", 1, 28, [(16, 14, 14), (32, 7, 7), (32, 7, 7)]),
    ("preactresnet18", 3, 32, [(128, 16, 16), (256, 8, 8), (512, 4, 4)]),
    ("resnet18", 3, 32, [(128, 16, 16), (256, 8, 8), (512, 4, 4)])])
def test_default_stages_resolve_on_every_resnet_and_the_cnn(name, c_in, size, shapes):
    m = build_model(name, 10, c_in, (0.5,) * c_in, (0.5,) * c_in).eval()
    nad.check_stages(m, CFG["at_stages"], CFG["betas"])
    with torch.no_grad(), Recorder(m, CFG["at_stages"]) as rec:
        m(torch.rand(1, c_in, size, size))
    assert [tuple(rec[s].shape[1:]) for s in CFG["at_stages"]] == shapes


def test_stage_errors():
    m = cnn()
    for stages, betas, msg in ((["layer9"], [1.0], "not stages of this model"), (["layer3", "layer2"], [1, 1],
                               "distinct and in forward order"), (["layer2", "layer2"], [1, 1], "distinct"),
                               (["layer2"], [1, 2], "1 at_stages .* but 2 betas")):
        with pytest.raises(UserError, match=msg):
            nad.check_stages(m, stages, betas)


def test_the_teacher_stays_frozen_and_sees_the_students_batch_and_the_student_runs_once_per_step():
    x, y = data()
    student, teacher = cnn(0), cnn(1)
    seen = {"s": [], "t": []}
    student.register_forward_pre_hook(lambda m, i: seen["s"].append(i[0].clone()))
    teacher.register_forward_pre_hook(lambda m, i: seen["t"].append(i[0].clone()))
    bn = student.layers[0][1]
    old_mean = bn.running_mean.clone()
    with torch.no_grad():   # the first BN's batch mean; the whole set is one batch
        z = student.layers[0][0](student.normalize(x.float() / 255))
    before = copy.deepcopy(teacher.state_dict())
    opt = nad.make_sgd(student.parameters(), CFG)
    ctx = SimpleNamespace(cfg={**CFG, "nad_epochs": 1, "batch_size": 24}, precision=FP32, evaluate=lambda m: {},
                          run=SimpleNamespace(save_model=lambda *a: None), plain_payload=lambda m: None)
    state = {"student": student, "teacher": teacher, "opt_student": opt,
             "gen_shuffle": SimpleNamespace(gen=generator(0, "s"))}
    phase = nad.nad_phase(ctx, x, y, state, lambda b: b, write_teacher=False)
    phase.setup()
    row = phase.train_epoch(1)
    assert not teacher.training and not any(q.requires_grad for q in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert len(seen["s"]) == len(seen["t"]) == 1 and torch.equal(seen["s"][0], seen["t"][0])
    # one BN update per step: momentum 0.1 once, not BackdoorBench's four passes
    assert torch.allclose(bn.running_mean, 0.9 * old_mean + 0.1 * z.mean((0, 2, 3)), atol=1e-6)
    assert row["lr"] == 0.01 and set(row) >= {"train_loss", "train_loss_ce", "at_layer2", "at_layer3", "at_layer4"}


def test_one_hooked_forward_gives_the_gradient_of_four_truncated_passes():
    x, y = data()
    xb, teacher, grads = x.float() / 255, cnn(1).eval(), []
    with torch.no_grad(), Recorder(teacher, CFG["at_stages"]) as rec_t:
        teacher(xb)
    feats_t = [rec_t[s] for s in CFG["at_stages"]]
    for four in (False, True):
        s = cnn(0).train()
        if four:   # BackdoorBench: the full model, then one truncated copy per stage (layers.2, .4, .5 of the CNN)
            logits, z = s(xb), s.normalize(xb)
            feats = [s.layers[:3](z), s.layers[:5](z), s.layers[:6](z)]
        else:
            with Recorder(s, CFG["at_stages"]) as rec:
                logits = s(xb)
            feats = [rec[n] for n in CFG["at_stages"]]
        nad.nad_loss(logits, y, feats, feats_t, CFG["betas"])[0].backward()
        grads.append([q.grad.clone() for q in s.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(*grads))


def test_learning_rate_rules():
    cfg = {"lr": 0.1, "lr_mid": 0.02, "lr_late": 0.003}
    assert [nad.step_lr(k, cfg) for k in (0, 1, 2, 19, 20, 25)] == [0.1, 0.1, 0.02, 0.02, 0.003, 0.003]
    assert {nad.step_lr(k, CFG) for k in range(10)} == {0.01}
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = make_scheduler(opt, {"lr_scheduler": "CosineAnnealingLR", "cos_t_max": 100, "eta_min": 0.0})
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.01 * (1 + math.cos(math.pi * e / 100)) / 2 for e in range(10)])
    assert lrs[-1] == pytest.approx(0.009801, abs=1e-6)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    plateau = make_scheduler(opt, {"lr_scheduler": "ReduceLROnPlateau", "plateau_factor": 0.1, "plateau_patience": 10})
    for _ in range(10):   # tiny's schedule on a flat loss: no cut within 10 epochs
        plateau.step(1.0)
    assert opt.param_groups[0]["lr"] == 0.01


def test_a_teacher_from_a_file_must_fit_the_record(tmp_path):
    info = {"model_name": "cnn", "input_shape": [1, 28, 28], "width": 4}
    other = cnn(3, width=8)
    atomic_torch_save({"format_version": 2, **model_payload(other, "cnn", [1, 28, 28], 8, "fashion_mnist")},
                      tmp_path / "wide.pt")
    with pytest.raises(UserError, match="width 8.*give a model.pt of the same architecture"):
        nad.load_teacher(tmp_path / "wide.pt", info, cnn(0))
    good = cnn(3)
    atomic_torch_save({"format_version": 2, **model_payload(good, "cnn", [1, 28, 28], 4, "fashion_mnist")},
                      tmp_path / "t.pt")
    t = cnn(0)
    assert len(nad.load_teacher(tmp_path / "t.pt", info, t)) == 64
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), good.state_dict().values()))


def test_a_subset_without_a_class_is_refused():
    with pytest.raises(UserError, match=r"no sample of class\(es\) \[3\]"):
        nad.check_classes(torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9]), 10, False)
    nad.check_classes(torch.tensor([0, 1]), 10, True)


# --- end to end on the tiny record ---------------------------------------------------------------------------------

def run_nad(record, *extra):
    return nad.main(["--result_file", str(record), "--te_epochs", "2", "--nad_epochs", "2", "--ratio", "0.2",
                     "--batch_size", "64", "--eval_batch_size", "256", "--amp", "false", "--channels_last", "false",
                     *extra])


def final(out):
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in
            csv.DictReader((out / "metrics.csv").open())]
    return load_model_file(out / "model.pt")[0].state_dict(), rows, (out / "teacher.pt").read_bytes()


def test_a_run_trains_a_teacher_distils_and_resumes_after_every_epoch(tiny_record, monkeypatch):
    from utils.record import load_attack_record
    from utils.run_folder import Run
    out = Path(tiny_record) / "defense" / "nad"
    theta_bd = load_attack_record(tiny_record, device="cpu").model.state_dict()
    firsts, original_epoch = [], nad.nad_epoch

    def spy(student, teacher, *a, **k):   # the student starts at theta_bd, not at the (fine-tuned) teacher
        if not firsts:
            firsts.append((copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())))
        return original_epoch(student, teacher, *a, **k)
    monkeypatch.setattr(nad, "nad_epoch", spy)
    s = run_nad(tiny_record)
    st, te = firsts[0]
    assert all(torch.equal(st[k], theta_bd[k]) for k in theta_bd) and not all(torch.equal(te[k], st[k]) for k in st)
    want = final(out)
    assert [(r["phase"], r["epoch"]) for r in want[1]] == [("teacher", "1"), ("teacher", "2"), ("nad", "1"),
                                                            ("nad", "2")]
    assert want[1][0]["at_layer2"] == "" and float(want[1][2]["at_layer4"]) >= 0
    assert s["teacher_test_acc"] == float(want[1][1]["test_acc"]) and s["at_stages"] == ["layer2", "layer3", "layer4"]
    assert len((out / "index.txt").read_text().split()) == 120
    original = Run.save_checkpoint
    for stops in (((0, 1), (1, 1)), ((0, 2), (1, 2))):   # killed after each epoch of each phase, resumed each time
        shutil.rmtree(out)
        for i, stop in enumerate(stops):
            def die(self, epoch, state, phase=0, stop=stop):
                original(self, epoch, state, phase)
                if (phase, epoch) == stop:
                    raise KeyboardInterrupt
            monkeypatch.setattr(Run, "save_checkpoint", die)
            with pytest.raises(KeyboardInterrupt):
                run_nad(tiny_record, *(("--resume",) if i else ()))
        monkeypatch.setattr(Run, "save_checkpoint", original)
        run_nad(tiny_record, "--resume")
        got = final(out)
        assert all(torch.equal(got[0][k], want[0][k]) for k in want[0]), stops
        assert got[1] == want[1] and got[2] == want[2], stops
    # streams: the teacher depends neither on nad_epochs nor on the test sets; a file teacher skips the phase
    from utils import defense

    class NoiseSets(defense.EvalSets):
        def __init__(self, data, device):
            super().__init__(data, device)
            self.x_test = torch.randint(0, 256, self.x_test.shape, dtype=torch.uint8, generator=generator(0, "t"))
    monkeypatch.setattr(defense, "EvalSets", NoiseSets)
    run_nad(tiny_record, "--overwrite", "--nad_epochs", "1")
    monkeypatch.undo()
    other = final(out)
    assert other[2] == want[2] and [r["train_loss"] for r in other[1][:2]] == [r["train_loss"] for r in want[1][:2]]
    assert other[1][1]["clean_test_loss"] != want[1][1]["clean_test_loss"]   # the noise did reach the evaluation
    r = run_nad(tiny_record, "--overwrite", "--teacher_model", str(Path(tiny_record) / "model.pt"))
    assert r["teacher_from_file"] and not (out / "teacher.pt").exists()
    assert "sha256" in (out / "config.yaml").read_text() and all(
        row["phase"] == "nad" for row in csv.DictReader((out / "metrics.csv").open()))


def test_configuration(tiny_record, tmp_path):
    for key, msg in (("epochs", "use te_epochs .teacher. and nad_epochs"), ("momentum", "SGD momentum is sgd_momentum"),
                     ("weight_decay", "weight decay is wd")):
        (tmp_path / "bad.yaml").write_text(f"{key}: 1\n")
        with pytest.raises(UserError, match=f"key '{key}' is not accepted by NAD: {msg}"):
            nad.configure(["--result_file", str(tiny_record), "--yaml_path", str(tmp_path / "bad.yaml")])
    with pytest.raises(UserError, match="3 at_stages but 2 betas"):
        nad.configure(["--result_file", str(tiny_record), "--betas", "1,2"])
    cfg, args = nad.configure(["--result_file", str(tmp_path / "not_yet")], dataset="tiny")
    assert cfg["batch_size"] == 128 and cfg["lr_scheduler"] == "ReduceLROnPlateau" and args.deviations == []
    cfg, args = nad.configure(["--result_file", str(tiny_record)])
    assert cfg["betas"] == [500.0, 1000.0, 1000.0] and args.deviations == []
    cfg, args = nad.configure(["--result_file", str(tmp_path / "not_yet"), "--yaml_path",
                               str(REPO / "config/defense/nad/authors_cifar10.yaml")], dataset="cifar10")
    assert cfg["lr"] == 0.1 and cfg["nesterov"] and "lr = 0.1 (spec: 0.01)" in args.deviations
    cfg, args = nad.configure(["--result_file", str(tmp_path / "not_yet"), "--yaml_path",
                               str(REPO / "config/defense/nad/backdoorbench_effective.yaml")], dataset="cifar10")
    assert cfg["at_stages"] == ["layer3", "layer4"] and cfg["out_name"] == "nad-bb" and len(args.deviations) == 3
