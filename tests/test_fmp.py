"""FMP (fmp.md §7): hooks in forward order, the FGSM bounds, per-map gradients from the shared graph, the stable
selection rule, pruning by module identity with the BN identity rule, eval-mode ranking, and real runs."""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from defense import fmp
from defense import fmp_ranking as ranking
from utils.stages import Recorder
from models import build_model
from utils.errors import UserError


def small(name, width, c=3):
    torch.manual_seed(0)
    return build_model(name, 10, c, [0.5] * c, [0.5] * c, width).eval()


def expected_forward_order(name):
    """Conv names in the order each architecture's forward pass calls them (written out from the model code)."""
    if name == "cnn":
        return ["layers.0.0", "layers.2.0", "layers.4.0", "layers.5.0"]
    if name == "vgg19_bn":
        m = small("vgg19_bn", 4)
        return [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]  # sequential: registration order
    names = ["conv1"]
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}"
            has_sc = stage > 1 and block == 0
            if name == "preactresnet18":  # a = relu(bn1(x)); shortcut(a); conv1(a); conv2(...)
                names += ([f"{p}.shortcut.0"] if has_sc else []) + [f"{p}.conv1", f"{p}.conv2"]
            else:  # resnet18: bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)
                names += [f"{p}.conv1", f"{p}.conv2"] + ([f"{p}.shortcut.0"] if has_sc else [])
    return names


# --- hooks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,width,c,size", [("cnn", 16, 1, 28), ("preactresnet18", 4, 3, 16),
                                               ("resnet18", 4, 3, 16), ("vgg19_bn", 4, 3, 16)])
def test_hooks_see_every_conv_once_in_forward_order(name, width, c, size):
    m = small(name, width, c)
    layers, uncalled = ranking.conv_layers(m, torch.rand(2, c, size, size))
    names = [n for n, _, _ in layers]
    all_convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert uncalled == [] and sorted(names) == sorted(all_convs) and len(set(names)) == len(names)
    assert names == expected_forward_order(name)
    assert m.training is False
    m.train()
    ranking.conv_layers(m, torch.rand(2, c, size, size))
    assert m.training is True     # the previous mode comes back


def test_preactresnet18_has_20_convs_and_4800_maps_and_75_pruned():
    m = small("preactresnet18", 64)
    layers, _ = ranking.conv_layers(m, torch.rand(1, 3, 8, 8))
    assert len(layers) == 20 and sum(ch for *_, ch in layers) == 4800
    names = [n for n, _, _ in layers]
    assert names[:7] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                         "layer2.0.shortcut.0", "layer2.0.conv1"]
    counts = [fmp.maps_to_prune(ch, 1 / 64, 0) for *_, ch in layers]
    assert sum(counts) == 75
    assert {ch: fmp.maps_to_prune(ch, 1 / 64, 0) for *_, ch in layers} == {64: 1, 128: 2, 256: 4, 512: 8}


def test_a_conv_called_twice_is_an_error_and_an_unused_conv_is_listed():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.unused = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(self.conv(x[:, :1]).sum(1, keepdim=True))

    with pytest.raises(UserError, match="called more than once"):
        ranking.conv_layers(Twice(), torch.rand(1, 1, 5, 5))

    class Once(Twice):
        def forward(self, x):
            return self.conv(x)
    layers, uncalled = ranking.conv_layers(Once(), torch.rand(1, 1, 5, 5))
    assert [n for n, _, _ in layers] == ["conv"] and uncalled == ["unused"]


def test_in_place_change_of_a_conv_output_is_refused():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True))
    with pytest.raises(UserError, match="in place"):
        ranking.conv_layers(net, torch.rand(1, 1, 5, 5))


# --- FGSM --------------------------------------------------------------------------------------------------

def test_random_start_and_fgsm_images_stay_in_bounds_and_scores_are_multiples_of_1_over_b():
    m = small("cnn", 4, 1)
    x = 0.1 + 0.8 * torch.rand(8, 1, 28, 28)
    x[:, :, :4] = 0.0   # saturated pixels: the clip must act
    x[:, :, -4:] = 1.0
    y = torch.randint(0, 10, (8,))
    alpha, eps = 0.02, 0.06
    x0 = ranking.random_start(x, alpha, torch.Generator().manual_seed(0))
    assert x0.min() >= 0 and x0.max() <= 1 and (x0 - x).abs().max() <= alpha + 1e-6
    assert torch.allclose((x0 - x).abs()[:, :, 4:-4], torch.tensor(alpha))  # exactly +-alpha where no clip acts
    low = x0[:, :, :4]
    assert torch.equal(low.unique(), torch.tensor([0.0, alpha]))  # 0 - alpha is clipped to 0, 0 + alpha stays
    x0g = x0.clone().requires_grad_(True)
    with Recorder(m, kind=nn.Conv2d) as rec:
        m(x0g)
    out = rec.outputs()[1][2]
    with torch.no_grad(), Recorder(m, kind=nn.Conv2d) as rec:
        m(x)
    clean = rec.outputs()[1][2]
    x_adv = ranking.fgsm_step(x0, ranking.map_gradients(out, clean, x0g, [0, 5, 7]), eps)
    assert x_adv.shape == (3, 8, 1, 28, 28)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= alpha + eps + 1e-6
    assert (x_adv - x).abs().max() > alpha + eps - 1e-6  # the bound is reached: no projection onto an eps ball
    ranked = ranking.rank_feature_maps(m, x, y, x0, eps, "batched", 7)
    scores = torch.cat([s for *_, s in ranked])
    assert len(scores) == 44 and torch.equal(scores * 8, (scores * 8).round())


@pytest.mark.parametrize("mode", ["loop", "batched"])
def test_shared_graph_gradient_equals_a_fresh_forward(mode):
    m = small("preactresnet18", 4)
    x = torch.rand(4, 3, 16, 16)
    x0 = ranking.random_start(x, 0.02, torch.Generator().manual_seed(1))
    with torch.no_grad(), Recorder(m, kind=nn.Conv2d) as rec:
        m(x)
    clean = {n: o for n, _, o in rec.outputs()}
    x0g = x0.clone().requires_grad_(True)
    with Recorder(m, kind=nn.Conv2d) as rec:
        m(x0g)
    traced = {n: o for n, _, o in rec.outputs()}
    for layer, chans in [("conv1", [0, 3]), ("layer2.0.shortcut.0", [1, 7]), ("layer4.1.conv2", [2, 31])]:
        shared = ranking.map_gradients(traced[layer], clean[layer], x0g, chans, mode)
        for j, c in enumerate(chans):
            fresh_x0 = x0.clone().requires_grad_(True)
            with Recorder(m, kind=nn.Conv2d) as rec:
                m(fresh_x0)
            out = dict((n, o) for n, _, o in rec.outputs())[layer]
            g = torch.autograd.grad((out[:, c] - clean[layer][:, c]).pow(2).mean(), fresh_x0)[0]
            assert torch.allclose(shared[j], g, rtol=1e-4, atol=1e-9)
            assert g.abs().sum() > 0


def test_loop_and_batched_rankings_agree():
    m = small("cnn", 4, 1)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    x0 = ranking.random_start(x, 0.02, torch.Generator().manual_seed(0))
    a = torch.cat([s for *_, s in ranking.rank_feature_maps(m, x, y, x0, 0.06, "loop", 5)])
    b = torch.cat([s for *_, s in ranking.rank_feature_maps(m, x, y, x0, 0.06, "batched", 16)])
    assert torch.equal(a, b)


def test_ranking_leaves_batchnorm_statistics_and_mode_unchanged():
    m = small("resnet18", 2)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.rand(4, 3, 8, 8)
    ranking.rank_feature_maps(m, x, torch.zeros(4, dtype=torch.long), ranking.random_start(x, 0.02, torch.Generator()), 0.06)
    fmp.bn_after_conv(m, x[:1])
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in m.parameters())


def test_ranking_batch_is_reproducible_and_unaugmented():
    x_sub = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    y_sub = torch.arange(50) % 10
    x, y, pick = fmp.ranking_batch(x_sub, y_sub, 32, seed=0)
    x2, _, pick2 = fmp.ranking_batch(x_sub, y_sub, 32, seed=0)
    _, _, pick3 = fmp.ranking_batch(x_sub, y_sub, 32, seed=1)
    assert torch.equal(pick, pick2) and not torch.equal(pick, pick3) and len(set(pick.tolist())) == 32
    assert torch.equal(x, x_sub[pick].float() / 255) and torch.equal(y, y_sub[pick])  # the stored pixels, no crop
    with pytest.raises(UserError, match="rank_batch_size"):
        fmp.ranking_batch(x_sub, y_sub, 51, seed=0)


# --- selection -------------------------------------------------------------------------------------------

def test_ties_resolve_to_the_lower_channel_index():
    scores = torch.tensor([0.5, 0.25, 0.25, 0.75, 0.25, 0.25, 0.5, 0.25], dtype=torch.float64)
    assert fmp.select_maps(scores, 2) == [1, 2]
    assert fmp.select_maps(scores, 5) == [1, 2, 4, 5, 7]
    assert fmp.select_maps(scores, 6) == [0, 1, 2, 4, 5, 7]
    assert fmp.select_maps(torch.full((64,), 0.5, dtype=torch.float64), 3) == [0, 1, 2]
    assert fmp.select_maps(scores, 0) == []


def test_counts_per_layer():
    assert fmp.maps_to_prune(32, 1 / 64, 0) == 0
    assert fmp.maps_to_prune(32, 1 / 64, 1) == 1
    assert fmp.maps_to_prune(64, 1 / 64, 0) == 1 and fmp.maps_to_prune(512, 1 / 64, 0) == 8
    assert fmp.maps_to_prune(100, 0.07, 0) == 7 and fmp.maps_to_prune(100, 0.29, 0) == 29  # no 28.999 -> 28


# --- pruning -----------------------------------------------------------------------------------------------

class Shuffled(nn.Module):
    """Registration order differs from forward order (bn_a, b, a, bn_b): the original's alignment bug case."""

    def __init__(self):
        super().__init__()
        self.bn_a = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 1)
        self.bn_c = nn.BatchNorm2d(4)

    def forward(self, x):
        h = torch.relu(self.bn_a(self.a(x)))          # a feeds bn_a directly
        h = self.b(h)
        h = torch.relu(self.bn_b(h + 0))             # b's output is changed before bn_b: no identity
        return self.bn_c(self.c(h)).mean((1, 2, 3))  # c feeds bn_c directly


def test_prune_zeroes_exactly_the_selected_slices_of_the_scored_modules():
    torch.manual_seed(0)
    net = Shuffled().eval()
    for bn in (net.bn_a, net.bn_b, net.bn_c):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, 0.5, 1.5)
    x = torch.rand(2, 1, 6, 6)
    layers, _ = ranking.conv_layers(net, x)
    assert [n for n, _, _ in layers] == ["a", "b", "c"]
    bn_map = fmp.bn_after_conv(net, x)
    assert bn_map == {"a": ["bn_a"], "c": ["bn_c"]}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    selection = [("a", 1), ("b", 2), ("b", 3), ("c", 0)]
    zeroed = fmp.prune(net, selection, bn_map)
    assert zeroed == [("bn_a", 1), ("bn_c", 0)]
    after = net.state_dict()
    expect_zero = {("a.weight", 1), ("b.weight", 2), ("b.weight", 3), ("c.weight", 0), ("bn_a.weight", 1),
                   ("bn_c.weight", 0)}
    for k, v in after.items():
        for c in range(v.shape[0]) if v.dim() else []:
            if (k, c) in expect_zero:
                assert torch.all(v[c] == 0), (k, c)
            else:
                assert torch.equal(v[c], before[k][c]), (k, c)  # biases, betas, other slices, running stats
    net2 = Shuffled()
    net2.load_state_dict(before)
    assert fmp.prune(net2, selection, {}) == []
    assert torch.equal(net2.bn_a.weight, before["bn_a.weight"])


def test_bn_identity_rule_on_the_registered_architectures():
    pre = fmp.bn_after_conv(small("preactresnet18", 4), torch.rand(1, 3, 16, 16))
    assert pre["conv1"] == ["layer1.0.bn1"] and pre["layer2.0.conv1"] == ["layer2.0.bn2"]
    assert not any(k.endswith(("conv2", "shortcut.0")) for k in pre) and len(pre) == 9
    post = fmp.bn_after_conv(small("resnet18", 4), torch.rand(1, 3, 16, 16))
    assert post["conv1"] == ["bn1"] and post["layer2.0.conv2"] == ["layer2.0.bn2"]
    assert post["layer2.0.shortcut.0"] == ["layer2.0.shortcut.1"] and len(post) == 20
    vgg = small("vgg19_bn", 4)
    assert len(fmp.bn_after_conv(vgg, torch.rand(1, 3, 16, 16))) == 16


@pytest.mark.parametrize("name,width,c,size", [("cnn", 4, 1, 28), ("preactresnet18", 2, 3, 8),
                                               ("resnet18", 2, 3, 8), ("vgg19_bn", 2, 3, 8)])
def test_rank_and_prune_run_on_every_model(name, width, c, size):
    m = small(name, width, c)
    x, y = torch.rand(4, c, size, size), torch.randint(0, 10, (4,))
    ranked = ranking.rank_feature_maps(m, x, y, ranking.random_start(x, 0.02, torch.Generator()), 0.06, "batched", 32)
    selection = [(n, ch) for n, _, s in ranked for ch in fmp.select_maps(s, fmp.maps_to_prune(len(s), 1 / 8, 1))]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bn_map = fmp.bn_after_conv(m, x[:1])
    zeroed = fmp.prune(m, selection, bn_map)
    mods = dict(m.named_modules())
    assert all(torch.all(mods[n].weight[ch] == 0) for n, ch in selection)
    # exactly the selected slices of the scored modules (by name, whatever the registration order) and the gammas
    # of the BNs fed by them changed; every other entry of the state dict is bit-identical
    expect = {(f"{n}.weight", ch) for n, ch in selection} | {(f"{b}.weight", ch) for b, ch in zeroed}
    assert {(b, ch) for b, ch in zeroed} == {(b, ch) for n, ch in selection for b in bn_map.get(n, [])}
    for k, v in m.state_dict().items():
        rows = {ch for key, ch in expect if key == k}
        keep = [i for i in range(v.shape[0]) if i not in rows] if v.dim() else []
        assert torch.equal(v[keep], before[k][keep]) if v.dim() else torch.equal(v, before[k]), k
    assert torch.isfinite(m(x)).all()


# --- the script -------------------------------------------------------------------------------------------

def fast(*extra):
    """Short runs with the spec's pruning rule (1/64 per layer) unless extra says otherwise."""
    return ["--epochs", "1", "--eval_batch_size", "512", "--ratio", "0.1", "--prune_ratio", "0.015625",
            "--min_prune_per_layer", "0", "--rank_batch_size", "8", *extra]


def test_tiny_run_writes_the_record_and_refuses_to_overwrite(tiny_record):
    s = fmp.main(["--result_file", str(tiny_record), *fast("--min_prune_per_layer", "1", "--hard_prune", "true",
                                                          "--rank_batch_size", "16")])
    out = Path(tiny_record) / "defense" / "fmp"
    for f in ("config.yaml", "model.pt", "metrics.csv", "summary.json", "curves.png", "log.txt", "index.txt",
              "ranking.csv", "pruned.json"):
        assert (out / f).exists(), f
    assert not (out / "checkpoint.pt").exists()
    rows = list(csv.DictReader(open(out / "ranking.csv")))
    assert len(rows) == 8 + 16 + 32 + 32 and sum(int(r["pruned"]) for r in rows) == 4
    plan = json.loads((out / "pruned.json").read_text())
    assert plan["pruned_per_layer"] == {"layers.0.0": 1, "layers.2.0": 1, "layers.4.0": 1, "layers.5.0": 1}
    assert len(plan["rank_batch_indices"]) == 16 and plan["layers_not_pruned"] == []
    subset = {int(v) for v in (out / "index.txt").read_text().split()}
    assert set(plan["rank_batch_indices"]) <= subset
    for k in ("test_acc", "test_asr", "test_ra", "attack_test_acc", "attack_test_asr", "der", "rir",
              "ranking_seconds", "finetune_seconds", "pruned_test_asr"):
        assert k in s
    metrics = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in metrics] == ["0", "1"]
    # hard_prune: the selected weights are still zero after fine-tuning
    weights = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    for sel in plan["selected"]:
        assert torch.all(weights[sel["module"] + ".weight"][sel["channel"]] == 0)
    for b in plan["bn_zeroed"]:
        assert weights[b["bn"] + ".weight"][b["channel"]] == 0
    with pytest.raises(UserError, match="--overwrite"):
        fmp.main(["--result_file", str(tiny_record), *fast()])


def test_original_rule_reports_layers_without_pruning_and_soft_prune_may_regrow(tiny_record, capsys):
    # the 1/64 rule on the width-8 CNN (8, 16, 32, 32 channels): no layer reaches 64, nothing is pruned, all reported
    s = fmp.main(["--result_file", str(tiny_record), "--overwrite", *fast()])
    assert s["layers_not_pruned"] == ["layers.0.0", "layers.2.0", "layers.4.0", "layers.5.0"] and s["n_pruned"] == 0
    assert "nothing is pruned there: layers.0.0, layers.2.0, layers.4.0, layers.5.0" in capsys.readouterr().out
    # 1/32: one map in each 32-channel layer; without hard_prune and without the BN gammas, the weights regrow
    s = fmp.main(["--result_file", str(tiny_record), "--overwrite", *fast("--bn_gamma", "off", "--prune_ratio", "0.03125")])
    assert s["layers_not_pruned"] == ["layers.0.0", "layers.2.0"]
    assert s["pruned_per_layer"] == {"layers.0.0": 0, "layers.2.0": 0, "layers.4.0": 1, "layers.5.0": 1}
    assert "nothing is pruned there: layers.0.0, layers.2.0" in capsys.readouterr().out
    out = Path(tiny_record) / "defense" / "fmp"
    plan = json.loads((out / "pruned.json").read_text())
    weights = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert plan["bn_zeroed"] == []
    assert any(weights[s["module"] + ".weight"][s["channel"]].abs().sum() > 0 for s in plan["selected"])


def test_resume_equals_an_uninterrupted_run(tiny_record, monkeypatch):
    args = ["--result_file", str(tiny_record), "--overwrite", *fast("--epochs", "2", "--min_prune_per_layer", "1")]
    full = fmp.main(args)
    out = Path(tiny_record) / "defense" / "fmp"
    w_full = torch.load(out / "model.pt", weights_only=True)["state_dict"]

    from utils.run_folder import Run
    original = Run.save_checkpoint

    def save_then_die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        if phase == 1 and epoch == 1:   # the first fine-tuning epoch
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):   # an interrupted --overwrite puts the complete record back
        fmp.main(args)
    assert (out / "summary.json").exists() and not (out / "checkpoint.pt").exists()
    shutil.rmtree(out)
    with pytest.raises(KeyboardInterrupt):
        fmp.main([a for a in args if a != "--overwrite"])
    assert (out / "checkpoint.pt").exists() and not (out / "summary.json").exists()
    monkeypatch.setattr(Run, "save_checkpoint", original)
    monkeypatch.setattr(fmp, "rank_and_prune", lambda *a: pytest.fail("a resumed run must not rank again"))
    resumed = fmp.main([a for a in args if a != "--overwrite"] + ["--resume"])
    w_res = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert resumed["test_asr"] == full["test_asr"] and resumed["n_pruned"] == full["n_pruned"]


def test_short_real_run_lowers_asr(real_badnet_record):
    """The fashion_mnist defaults, fewer epochs, on a real BadNets record (600 clean images for the defender)."""
    s = fmp.main(["--result_file", str(real_badnet_record), "--epochs", "6", "--batch_size", "64", "--eval_batch_size", "1000"])
    assert s["attack_test_asr"] > 0.9
    assert s["test_asr"] < 0.5 and s["der"] > 0.65, s
    assert s["test_acc"] > s["attack_test_acc"] - 0.15, s


def test_conv2_as_block_output_reproduces_the_originals_ranking_and_bn_set():
    """Spec §5 defects 11-12: with the option each PreAct block's conv2 is ranked by the block's output (conv2 +
    shortcut) and the gammas of the BNs that normalise that sum (the next blocks' bn1) are zeroed too: 16 BNs on
    PreActResNet18 instead of the identity rule's 9."""
    torch.manual_seed(0)
    m = build_model("preactresnet18", 10, 3, (0.5,) * 3, (0.5,) * 3, 4).eval()
    x = torch.rand(2, 3, 16, 16)
    own, _ = ranking.ranked_outputs(m, x)
    block, _ = ranking.ranked_outputs(m, x, as_block_output=True)
    assert [n for n, _, _ in own] == [n for n, _, _ in block] and len(own) == 20
    with torch.no_grad():
        b = m.layer2[0]
        expected = b(m.layer1(m.conv1(m.normalize(x))))
    got = dict((n, o) for n, _, o in block)["layer2.0.conv2"]
    assert torch.allclose(got, expected) and not torch.allclose(dict((n, o) for n, _, o in own)["layer2.0.conv2"], got)
    assert all(torch.equal(o1, o2) for (n, _, o1), (_, _, o2) in zip(own, block) if not n.endswith(".conv2"))
    assert sum(len(v) for v in fmp.bn_after_conv(m, x).values()) == 9
    wide = fmp.bn_after_conv(m, x, as_block_output=True)
    assert sum(len(v) for v in wide.values()) == 16 and wide["layer1.0.conv2"] == ["layer1.1.bn1"]
    assert "layer4.1.conv2" not in wide   # the last block's sum goes to the pooling, not to a BN


def test_ranking_is_fp32_whatever_amp_says(tiny_record):
    """Spec §5 defect 13: the ranking, and so the selection, is the same with --amp true and false."""
    out = Path(tiny_record) / "defense"
    a = fmp.main(["--result_file", str(tiny_record), "--overwrite", *fast("--amp", "true", "--epochs", "1")])
    ranking_true = (out / "fmp" / "ranking.csv").read_text()
    b = fmp.main(["--result_file", str(tiny_record), "--overwrite", *fast("--amp", "false", "--epochs", "1")])
    assert (out / "fmp" / "ranking.csv").read_text() == ranking_true
    assert a["n_pruned"] == b["n_pruned"]
