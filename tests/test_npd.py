"""NPD, the Neural Polarizer (docs/specs/npd.md §9): the insertion and where the polarizer sits, the estimated target
and its -10 quirk, L3 / L4 against hand values, the PGD projection, steps, clip and early stop, the loss weights and
L2's clean-prediction labels, the frozen model, the wrapper's file and its loaders (retune included), the options,
resume = uninterrupted, no test leak."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from defense import npd
from models import build_model
from utils.engine.device import Precision
from utils.errors import UserError
from utils.model_file import load_defense_model, load_model_file
from utils.record_names import FORMAT_VERSION

CPU = Precision(torch.device("cpu"), False, False)


def cfg_of(**kw):
    cfg = {o.name: o.default for o in npd.OPTIONS}
    cfg.update(kw)
    npd.resolve_settings(cfg)
    return cfg


def cnn(seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", 10, 1, (0.5,), (0.5,), 4).eval()


def polarized(inner, name="layers.5.0", residual=False):
    c = npd.target_module(inner, name).in_channels
    return npd.PolarizedModel(inner.requires_grad_(False), npd.make_polarizer(c), name, (1, 28, 28), residual).eval()


def test_the_polarizer_starts_as_the_identity_and_sees_the_target_layers_input():
    p = npd.make_polarizer(6).eval()
    a = torch.randn(3, 6, 5, 5)
    with torch.no_grad():
        assert torch.allclose(p(a), a / math.sqrt(1 + 1e-5), atol=1e-6)
    inner = cnn()
    m, seen, out4 = polarized(inner), [], []
    m.polarizer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    inner.layers[4].register_forward_hook(lambda mod, i, o: out4.append(o.clone()))
    with torch.no_grad():
        m(torch.rand(2, 1, 28, 28))
    assert len(seen) == 1 and torch.equal(seen[0], out4[0])
    torch.manual_seed(0)   # preactresnet18: conv1's input of layer4.1 is ReLU(BN1(u)), u that block's input
    r = build_model("preactresnet18", 10, 3, (0.5,) * 3, (0.5,) * 3, 4).eval()
    m, seen, u = npd.PolarizedModel(r, npd.make_polarizer(32), "layer4.1.conv1", (3, 32, 32)).eval(), [], []
    m.polarizer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    r.layer4[1].bn1.register_forward_pre_hook(lambda mod, args: u.append(args[0].clone()))
    with torch.no_grad():
        m(torch.rand(2, 3, 32, 32))
        assert len(seen) == 1 and torch.allclose(seen[0], F.relu(r.layer4[1].bn1(u[0])), atol=1e-6)
    with pytest.raises(UserError, match="not a Conv2d"):
        npd.target_module(r, "layer4.1.bn1")


def test_the_estimated_target_is_the_runner_up_with_the_finite_mask():
    z = torch.tensor([[2.0, 5.0, 1.0], [-20.0, 3.0, -30.0]])
    assert npd.estimated_target(z, torch.tensor([1, 1])).tolist() == [0, 1]


def test_l3_and_l4_match_the_hand_values_and_ties_go_to_the_lower_index():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    assert npd.strongest_wrong(p, torch.tensor([0])).item() == 1
    assert npd.one_minus_loss(p, torch.tensor([1])).item() == pytest.approx(0.3565321, abs=1e-6)
    assert npd.strongest_wrong(p, torch.tensor([2])).item() == 0
    assert npd.one_minus_loss(p, torch.tensor([0])).item() == pytest.approx(0.6929472, abs=1e-6)
    tie = torch.tensor([[0.4, 0.4, 0.2]])
    assert npd.strongest_wrong(tie, torch.tensor([2])).item() == 0 and npd.strongest_wrong(tie, torch.tensor([0])) == 1


def test_the_loss_weights_and_l2_uses_the_clean_prediction():
    torch.manual_seed(0)
    zc, za = torch.randn(4, 5), torch.randn(4, 5)
    y, y_hat, t = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 4, 2, 1]), torch.tensor([1, 0, 4, 2])
    out = npd.update_losses(zc, za, y, y_hat, t, cfg_of(lmd3=0.0))
    p = za.softmax(1)
    l4 = -torch.log(1.0001 - p[torch.arange(4), t] + 1e-12).mean()
    assert out["loss_adv"].item() == pytest.approx(F.cross_entropy(za, y_hat).item(), rel=1e-6)
    assert abs(out["loss_adv"].item() - F.cross_entropy(za, y).item()) > 1e-3
    assert out["loss_wrong"].item() == 0.0
    assert out["train_loss"].item() == pytest.approx(
        (F.cross_entropy(zc, y) + 0.4 * F.cross_entropy(za, y_hat) + 0.4 * l4).item(), rel=1e-6)
    assert npd.update_losses(zc, za, y, y_hat, t, cfg_of(lmd4=0.0))["loss_target"].item() == 0.0


def test_projection_scales_only_what_leaves_the_ball():
    d = torch.zeros(2, 1, 2, 2)
    d[0, 0, 0, 0], d[1, 0, 0, 0] = 6.0, 3.0
    out = npd.project(d, "L2", 3.0)
    assert torch.equal(out[0], d[0] * 0.5) and torch.equal(out[1], d[1])
    assert npd.project(torch.full((1, 1, 2, 2), 2.0), "L1", 4.0).abs().sum().item() == pytest.approx(4.0)
    assert npd.project(torch.full((1, 3), 0.5), "L_inf", 0.2).max().item() == pytest.approx(0.2)


class Spy(nn.Module):
    """A linear model (every input gradient non-zero) that remembers the range of what it is shown."""

    def __init__(self, shape, bias=None):
        super().__init__()
        torch.manual_seed(1)
        self.lin, self.seen = nn.Linear(math.prod(shape), 10), []
        if bias is not None:
            with torch.no_grad():
                self.lin.weight.mul_(1e-3)
                self.lin.bias.copy_(bias)

    def forward(self, x):
        self.seen.append((x.min().item(), x.max().item()))
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("shape,eps,norm", [((3, 32, 32), 10.0, 5.5426), ((3, 32, 32), 3.0, 3.0),
                                            ((1, 28, 28), 3.0, 2.8)])
def test_one_sign_step_has_the_specs_norm(shape, eps, norm):
    x, t = torch.full((2, *shape), 0.5), torch.tensor([3, 4])
    delta, steps = npd.targeted_pgd(Spy(shape), x, t, cfg_of(trigger_norm=eps, inner_steps=1), CPU)
    assert steps == 1 and delta.flatten(1).norm(dim=1).tolist() == pytest.approx([norm] * 2, abs=1e-3)


def test_gradient_steps_clip_and_early_stop():
    shape, t = (1, 4, 4), torch.tensor([3, 3])
    x = torch.full((2, *shape), 0.5)
    spy = Spy(shape)
    xr = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(spy(xr), t), xr)
    delta, _ = npd.targeted_pgd(spy, x, t, cfg_of(trigger_norm=100.0, inner_steps=1, pgd_step="gradient"), CPU)
    assert torch.allclose(delta, -0.1 * g, atol=1e-7)
    spy.seen.clear()   # large steps from the top of the pixel range: the model sees clip(x + delta) only
    npd.targeted_pgd(spy, torch.full((2, *shape), 0.99), t, cfg_of(trigger_norm=0.5, norm_type="L_inf",
                                                                   pgd_init="max", inner_steps=3), CPU)
    assert spy.seen and all(0.0 <= lo and hi <= 1.0 for lo, hi in spy.seen)
    hits = Spy(shape, bias=torch.eye(10)[3] * 50)             # always predicts 3: the first step already hits
    assert npd.targeted_pgd(hits, x, t, cfg_of(), CPU)[1] == 1
    assert npd.targeted_pgd(hits, x, torch.tensor([5, 5]), cfg_of(), CPU)[1] == 2


def test_the_attacked_model_stays_frozen_and_the_polarizer_statistics_move_only_where_they_should():
    inner = cnn()
    before = {k: v.clone() for k, v in inner.state_dict().items()}
    m = polarized(inner)
    params = list(m.polarizer.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8), torch.arange(40) % 10
    npd.warm_epoch(m, x, y, torch.optim.SGD(params, lr=1e-2), cfg_of(batch_size=16), CPU, g)
    after_warm = {k: v.clone() for k, v in m.polarizer.state_dict().items()}
    assert not torch.equal(after_warm["1.running_mean"], torch.zeros_like(after_warm["1.running_mean"]))
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    stats = npd.npd_epoch(m, x, y, opt, cfg_of(batch_size=16), CPU, g)
    assert 1 <= stats["pgd_steps_mean"] <= 2 and 0 <= stats["adv_hit_rate"] <= 1
    now = m.polarizer.state_dict()
    assert torch.equal(now["1.running_mean"], after_warm["1.running_mean"])
    assert torch.equal(now["1.running_var"], after_warm["1.running_var"])
    assert not torch.equal(now["0.weight"], after_warm["0.weight"])
    npd.npd_epoch(m, x, y, opt, cfg_of(batch_size=16, polarizer_train_mode=True), CPU, g)
    assert not torch.equal(m.polarizer.state_dict()["1.running_mean"], after_warm["1.running_mean"])
    assert all(torch.equal(before[k], v) for k, v in inner.state_dict().items())
    assert not m.training and not any(p.requires_grad for p in inner.parameters())


def test_the_wrapper_file_reloads_bit_identically_and_only_through_load_defense_model(tmp_path):
    m = polarized(cnn(), residual=True)
    with torch.no_grad():
        m.polarizer[0].weight.add_(0.05 * torch.randn_like(m.polarizer[0].weight))
        m.polarizer[1].running_mean.add_(0.3)
    path = tmp_path / "model.pt"
    torch.save({"format_version": FORMAT_VERSION, **m.payload("cnn", 4, "fashion_mnist")}, path)
    raw = torch.load(path, weights_only=True)
    assert "state_dict" not in raw and raw["defense"] == "npd" and raw["channels"] == 16
    with pytest.raises(UserError, match="load_defense_model"):
        load_model_file(path)
    back = load_defense_model(path)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert isinstance(back, npd.PolarizedModel) and back.use_residual
        assert torch.equal(back(x), m(x)) and torch.equal(back.head(back.features(x)), back(x))
        twin = copy.deepcopy(back)   # the hook follows the copy's own polarizer
        twin.polarizer[1].bias.add_(1.0)
        assert torch.equal(back(x), m(x)) and not torch.equal(twin(x), m(x))
    assert set(back.stages()) == {"layer1", "layer2", "layer3", "layer4"}


def test_options_per_norm_defaults_explicit_values_and_refused_keys(tiny_record, tmp_path):
    base = ["--result_file", str(tiny_record)]
    cfg, args = npd.configure(base)
    assert (cfg["trigger_norm"], cfg["adv_lr"], cfg["inner_steps"], cfg["pgd_init"]) == (3.0, 0.1, 2, "zero")
    assert "epochs = 20 (spec: 50)" in args.deviations
    cfg, _ = npd.configure(base + ["--norm_type", "L_inf"])
    assert (cfg["trigger_norm"], cfg["adv_lr"], cfg["inner_steps"], cfg["pgd_init"]) == (0.2, 0.44, 10, "max")
    assert npd.configure(base + ["--norm_type", "L_inf", "--trigger_norm", "0.1"])[0]["trigger_norm"] == 0.1
    with pytest.raises(UserError, match="whole pixel range"):
        npd.configure(base + ["--norm_type", "L_inf", "--trigger_norm", "3"])
    with pytest.raises(UserError, match="only convbn"):
        npd.configure(base + ["--model_name", "mlp"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr_scheduler: CosineAnnealingLR\n")
    with pytest.raises(UserError, match="lr_scheduler' is not accepted by NPD"):
        npd.configure(base + ["--yaml_path", str(bad)])


def run_npd(record, *extra):
    return npd.main(["--result_file", str(record), "--warm_epochs", "2", "--epochs", "2", "--ratio", "0.2",
                     "--batch_size", "32", "--eval_batch_size", "256", "--amp", "false", "--channels_last", "false",
                     *extra])


def polarizer_of(folder):
    return torch.load(Path(folder) / "model.pt", weights_only=True)["polarizer_state_dict"]


def test_a_run_writes_the_record_resumes_leaks_nothing_and_retunes(tiny_record, monkeypatch):
    import utils.defense
    from utils.run_folder import Run
    real, original = utils.defense.EvalSets, Run.save_checkpoint

    class Shuffled(real):   # other test sets: other figures, never another polarizer
        def __init__(self, data, device):
            super().__init__(data, device)
            self.x_test, self.x_bd = self.x_test.flip(0).roll(3, -1), self.x_bd.roll(5, -2)
    monkeypatch.setattr(utils.defense, "EvalSets", Shuffled)
    run_npd(tiny_record, "--out_suffix", "_leak")
    monkeypatch.setattr(utils.defense, "EvalSets", real)
    out = Path(tiny_record) / "defense" / "npd"
    want, figures = polarizer_of(out.parent / "npd_leak"), []
    # killed after a warm-up epoch, and after a main-phase epoch: resumed = uninterrupted, bit for bit
    for stop, suffix in ((1, ""), (2, "_k2")):
        def die(self, epoch, state, phase=0, stop=stop):
            original(self, epoch, state, phase)
            if phase == stop and epoch == 1:
                raise KeyboardInterrupt
        monkeypatch.setattr(Run, "save_checkpoint", die)
        with pytest.raises(KeyboardInterrupt):
            run_npd(tiny_record, "--out_suffix", suffix)
        monkeypatch.setattr(Run, "save_checkpoint", original)
        s = run_npd(tiny_record, "--out_suffix", suffix, "--resume")
        got = polarizer_of(out.parent / f"npd{suffix}")
        assert all(torch.equal(got[k], want[k]) for k in want)
        figures.append((s["test_acc"], s["test_asr"], s["test_ra"]))
    assert figures[0] == figures[1]
    for f in ("polarizer.json", "index.txt", "metrics.csv", "summary.json", "curves.png", "config.yaml", "model.pt"):
        assert (out / f).exists(), f
    s = json.loads((out / "summary.json").read_text())
    assert len((out / "index.txt").read_text().split()) == 120 and s["target_layer"] == "layers.5.0"
    assert s["polarizer_params"] == 32 * 32 + 64 and s["warmup_test_acc"] is not None and "der" in s
    rep = json.loads((out / "polarizer.json").read_text())
    assert rep["channels"] == 32 and rep["w_minus_identity"] > 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3", "4"] and "adv_hit_rate" in rows[0]
    assert yaml.safe_load((out / "config.yaml").read_text())["config"]["target_layer_name"] is None
    # the re-tuning attack starts from the polarized model and saves it as a wrapper again
    from analysis import retune
    rt = retune.main(["--result_file", str(out), "--epochs", "1", "--split_ratio", "0.2", "--poison_num", "5",
                      "--batch_size", "32", "--amp", "false", "--channels_last", "false"])
    assert rt["epoch0_matches_record"] and rt["start"]["test_acc"] == s["test_acc"]
    back = load_defense_model(out / "retune")
    assert isinstance(back, npd.PolarizedModel) and back.target_layer_name == "layers.5.0"
