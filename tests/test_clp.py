"""CLP (docs/specs/clp.md §9): UCLC against hand computations (1x1 and 3x3 kernels), the unbiased std and the strict
threshold, the z-score bound of narrow layers, pruning that silences a channel exactly, the two pairing rules on every
model (the traced one never fooled by a residual sum), non-finite scores, nested masks and a sweep that evaluates each
distinct mask once, a data-free result that no test image changes, resume, and the configuration."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from defense import clp
from models import build_model
from utils.errors import UserError
from utils.model_file import load_model_file

CFG = {"u": 3.0, "pairing": "direct", "include_bn_eps": True}


def conv_bn(weight, gamma, var, eps=0.0):
    c = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], bias=False)
    b = nn.BatchNorm2d(weight.shape[0], eps=eps)
    with torch.no_grad():
        c.weight.copy_(weight)
        b.weight.copy_(gamma)
        b.running_var.copy_(var)
    return c, b


def hand_layer(eps=0.0):
    w = torch.tensor([[3., 4.], [1., 0.], [0., 1.], [1., 1.]]).view(4, 2, 1, 1)
    return conv_bn(w, torch.tensor([1., 2., 1., 1.]), torch.tensor([4., 1., 1., 0.25]), eps)


def test_uclc_by_hand_with_the_unbiased_std_and_a_strict_threshold():
    s, f, u = clp.uclc(*hand_layer())
    assert torch.allclose(s, torch.tensor([5, 1, 1, math.sqrt(2)], dtype=torch.float64))
    assert torch.allclose(f, torch.tensor([0.5, 2, 1, 2], dtype=torch.float64))
    assert torch.allclose(u, torch.tensor([2.5, 2, 1, 2.828427], dtype=torch.float64), atol=1e-6)
    mean, sd = clp.layer_stats(u)
    assert mean == pytest.approx(2.082107, abs=1e-6) and sd == pytest.approx(0.797773, abs=1e-6)
    assert clp.select(u, 0.5) == [0, 3] and clp.select(u, 0.0) == [0, 3]
    assert clp.select(u, 1.0) == []                       # t = 2.879880
    assert u[3] > mean + 1.0 * u.std(correction=0)        # the biased std would prune channel 3: the test pins it
    with_eps = clp.uclc(*hand_layer(1e-5))[2]
    assert clp.select(with_eps, 0.5) == [0, 3] and clp.select(with_eps, 1.0) == []


def test_the_spectral_norm_of_a_3x3_kernel_is_that_of_its_reshaped_matrix():
    a, b = torch.tensor([1., 2.]), torch.tensor([1., 0, 0, 0, 2, 0, 0, 0, 0])
    c, bn = conv_bn(torch.outer(a, b).view(1, 2, 3, 3), torch.ones(1), torch.ones(1))
    assert clp.uclc(c, bn)[0].item() == pytest.approx(5.0)
    torch.manual_seed(0)
    c, bn = conv_bn(torch.randn(6, 5, 3, 3), torch.ones(6), torch.ones(6))
    want = torch.linalg.svdvals(c.weight.double().reshape(6, 5, 9)).max(1).values
    assert torch.allclose(clp.uclc(c, bn)[0], want)


def test_layers_of_ten_channels_or_fewer_can_never_be_pruned_at_u3():
    torch.manual_seed(0)
    for n in range(2, 11):
        extreme = torch.zeros(n, dtype=torch.float64)
        extreme[0] = 100
        mean, sd = clp.layer_stats(extreme)
        assert (100 - mean) / sd == pytest.approx(clp.z_bound(n))
        assert clp.select(extreme, 3.0) == [] and clp.select(torch.rand(n, dtype=torch.float64) * 10, 3.0) == []
    eleven = torch.zeros(11, dtype=torch.float64)
    eleven[0] = 100
    assert clp.select(eleven, 3.0) == [0]


def test_a_pruned_channel_is_exactly_zero_in_eval_and_train_mode():
    torch.manual_seed(0)
    m = build_model("cnn", 10, 1, (0.5,), (0.5,), 4)
    bn = m.layers[2][1]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    x = torch.rand(5, 1, 28, 28)
    rec = {}
    bn.register_forward_hook(lambda mod, i, out: rec.__setitem__("out", out.detach().clone()))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    m.eval()
    m(x)
    ref = rec["out"]
    clp.prune_(m, {"layers.2.1": [1, 5]})
    m(x)
    out = rec["out"]
    assert (out[:, [1, 5]] == 0).all() and torch.equal(out[:, [0, 2, 3, 4, 6, 7]], ref[:, [0, 2, 3, 4, 6, 7]])
    assert torch.equal(bn.running_mean, before["running_mean"]) and torch.equal(bn.running_var, before["running_var"])
    m.train()
    m(x)
    assert (rec["out"][:, [1, 5]] == 0).all()


def pairs(name, rule, c_in=3, size=32, width=4):
    m = build_model(name, 10, c_in, (0.5,) * c_in, (0.5,) * c_in, width)
    return clp.find_pairs(m, (c_in, size, size), rule)


def test_pairing_rules_on_every_model():
    direct, unscored, no_bn = pairs("preactresnet18", "direct")
    assert len(direct) == 9 and ("layer1.0.bn1", "conv1") in direct
    assert all((f"layer{i}.{j}.bn2", f"layer{i}.{j}.conv1") in direct for i in range(1, 5) for j in (0, 1))
    assert len(unscored) == 7 and "layer4.1.conv2" in no_bn
    reg = dict(pairs("preactresnet18", "registration")[0])
    assert len(reg) == 16 and reg["layer1.1.bn1"] == "layer1.0.conv2" and reg["layer2.0.bn1"] == "layer1.1.conv2"
    assert all(reg[f"layer{i}.1.bn1"] == f"layer{i}.0.shortcut.0" for i in (2, 3, 4))
    for name, n, c_in, size in (("cnn", 4, 1, 28), ("resnet18", 20, 3, 32), ("vgg19_bn", 16, 3, 32)):
        a, b = pairs(name, "direct", c_in, size)[0], pairs(name, "registration", c_in, size)[0]
        assert len(a) == n and sorted(a) == sorted(b), name


class Crossed(nn.Module):
    """bn reads c1's output, but c2 is the last convolution registered before it."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(1, 3, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.c2(self.bn(self.c1(x)))


def test_pairing_errors_and_bn_free_models():
    assert clp.find_pairs(Crossed(), (1, 4, 4), "direct")[0] == [("bn", "c1")]
    with pytest.raises(UserError, match="BatchNorm bn .3 channels. is paired with convolution c2 .4 output"):
        clp.find_pairs(Crossed(), (1, 4, 4), "registration")
    with pytest.raises(UserError, match="no convolution followed by a BatchNorm"):
        clp.find_pairs(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()), (1, 4, 4), "direct")


def test_non_finite_scores_are_an_error_unless_eps_is_included():
    c, b = conv_bn(torch.ones(2, 1, 1, 1), torch.ones(2), torch.tensor([1.0, 0.0]), eps=1e-5)
    with pytest.raises(UserError, match="channel 1 has a non-finite UCLC"):
        clp.uclc(c, b, include_eps=False)
    assert torch.isfinite(clp.uclc(c, b, include_eps=True)[2]).all()


def test_masks_are_nested_in_u_and_the_sweep_evaluates_each_distinct_mask_once():
    torch.manual_seed(0)
    m = build_model("cnn", 10, 1, (0.5,), (0.5,), 16)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.uniform_(-2, 2)
    layers = clp.score_model(m, (1, 28, 28), CFG)[0]
    grid = torch.linspace(0, 3, 13, dtype=torch.float64).tolist()
    for u1, u2 in zip(grid, grid[1:]):
        a, b = clp.masks_at(layers, u1), clp.masks_at(layers, u2)
        assert all(set(b[k]) <= set(a[k]) for k in a)
    calls = []
    rows = clp.sweep(layers, grid, lambda masks: calls.append(masks) or dict.fromkeys(
        ("test_acc", "test_asr", "test_ra", "clean_test_loss", "bd_test_loss"), float(len(calls))))
    distinct = {tuple(tuple(v) for v in clp.masks_at(layers, u).values()) for u in grid}
    assert len(calls) == len(distinct) > 1 and len(rows) == 13 and rows[0]["n_pruned"] >= rows[-1]["n_pruned"]


def test_the_registration_rule_reproduces_the_originals_loop():
    torch.manual_seed(1)
    m = build_model("resnet18", 10, 3, (0.5,) * 3, (0.5,) * 3, 4)   # post-activation: every conv has its BN
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.uniform_(-2, 2)
                mod.running_var.uniform_(0.1, 3)
    u, want, conv = 1.0, {}, None
    for name, mod in m.named_modules():   # the authors' loop, from spec §4
        if isinstance(mod, nn.Conv2d):
            conv = mod
        elif isinstance(mod, nn.BatchNorm2d):
            w = conv.weight
            lips = torch.stack([torch.linalg.svdvals(w[k].reshape(w.shape[1], -1)).max() * mod.weight[k].abs()
                                / mod.running_var[k].sqrt() for k in range(w.shape[0])]).detach()
            want[name] = (lips > lips.mean() + u * lips.std()).nonzero().flatten().tolist()
    layers = clp.score_model(m, (3, 32, 32), {"pairing": "registration", "include_bn_eps": False})[0]
    assert clp.masks_at(layers, u) == want and sum(map(len, want.values())) > 0


def test_scores_do_not_depend_on_the_thread_count():
    m = build_model("cnn", 10, 1, (0.5,), (0.5,), 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = [l["uclc"] for l in clp.score_model(m, (1, 28, 28), CFG)[0]]
        torch.set_num_threads(2)
        b = [l["uclc"] for l in clp.score_model(m, (1, 28, 28), CFG)[0]]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- end to end on the tiny record ---------------------------------------------------------------------------------

def run_clp(record, *extra):
    return clp.main(["--result_file", str(record), "--u", "1", "--u_num", "3", "--u_max", "2",
                     "--eval_batch_size", "256", "--amp", "false", "--channels_last", "false", *extra])


def files(out):
    return {f: (out / f).read_bytes() for f in ("uclc.csv", "pruned.json", "model.pt")}


def test_a_run_is_data_free_deterministic_and_resumes(tiny_record, monkeypatch):
    from utils import defense
    from utils.run_folder import Run
    out = Path(tiny_record) / "defense" / "clp"
    monkeypatch.setattr(defense.DefenseContext, "clean_subset", lambda *a: pytest.fail("CLP draws no data"))
    s = run_clp(tiny_record)
    p = json.loads((out / "pruned.json").read_text())
    assert s["n_pruned"] == p["n_pruned"] > 0 and s["defender_data"] == "none" and s["n_scored_layers"] == 4
    assert not (out / "index.txt").exists() and (out / "u_sweep.png").exists()
    assert (out / "u_sweep.csv").read_text().startswith("# analysis only: not used to choose u\nu,n_pruned,")
    model, _ = load_model_file(out / "model.pt")
    for layer in p["layers"]:
        bn = dict(model.named_modules())[layer["bn"]]
        assert (bn.weight[layer["pruned_channels"]] == 0).all() and (bn.bias[layer["pruned_channels"]] == 0).all()
    first = files(out)

    class NoiseSets(defense.EvalSets):   # other test data: the result must not move
        def __init__(self, data, device):
            super().__init__(data, device)
            g = torch.Generator().manual_seed(5)
            self.x_test = torch.randint(0, 256, self.x_test.shape, dtype=torch.uint8, generator=g)
            self.x_bd = torch.randint(0, 256, self.x_bd.shape, dtype=torch.uint8, generator=g)
    monkeypatch.setattr(defense, "EvalSets", NoiseSets)
    run_clp(tiny_record, "--overwrite", "--u_sweep", "false")
    assert files(out) == first and not (out / "u_sweep.csv").exists()
    monkeypatch.undo()
    # interrupted after its checkpoint, resumed: nothing is scored again, the same files
    original = Run.save_checkpoint

    def die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        raise KeyboardInterrupt
    shutil.rmtree(out)
    monkeypatch.setattr(Run, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        run_clp(tiny_record)
    monkeypatch.setattr(Run, "save_checkpoint", original)
    monkeypatch.setattr(clp, "score_model", lambda *a: pytest.fail("a resumed run must not score again"))
    r = run_clp(tiny_record, "--resume")
    assert files(out) == first and r["test_acc"] == s["test_acc"] and r["test_asr"] == s["test_asr"]


def test_configuration(tiny_record, tmp_path):
    for key in ("epochs", "lr", "ratio"):
        (tmp_path / "bad.yaml").write_text(f"{key}: 1\n")
        with pytest.raises(UserError, match=f"key '{key}' is not accepted by CLP: it is data-free"):
            clp.configure(["--result_file", str(tiny_record), "--yaml_path", str(tmp_path / "bad.yaml")])
    for argv, msg in ((["--u", "-1"], "u = -1.0"), (["--u_min", "3", "--u_max", "2"], "u_min 3.0 > u_max 2.0"),
                      (["--u_num", "0"], "u_num = 0"), (["--u_num", "2.5"], "expected an integer")):
        with pytest.raises(UserError, match=msg):
            clp.configure(["--result_file", str(tiny_record), *argv])
    cfg, args = clp.configure(["--result_file", str(tmp_path / "not_yet")], dataset="tiny")
    assert cfg["u"] == 5.0 and args.deviations == []
    cfg, args = clp.configure(["--result_file", str(tiny_record)])          # fashion_mnist: the defaults
    assert cfg["u"] == 3.0 and cfg["pairing"] == "direct" and args.deviations == []
