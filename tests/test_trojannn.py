"""TrojanNN (docs/specs/trojannn.md §9): neuron selection by hand and from the trained head, one optimisation step by
hand on a toy model, the tolerance stop, the mask footprints, the quantisation, both insertions by hand, the two
resources reproducible, reused and refused (incomplete, another dataset, stale, damaged, other settings, rebuilt),
and records that rebuild their poisoned sets bit for bit with the resource folders deleted."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import utils.clean_model as cm
from attack import trojannn as tj
from models import build_model
from utils.data import load_dataset
from utils.errors import UserError
from utils.model_file import load_model_file
from utils.record import load_attack_record
from utils.triggers import read_pattern_png, trigger_file_bytes, trigger_from_record

FAST = ["--model_width", "2", "--mask_update_iters", "15", "--device", "cpu", "--amp", "false",
        "--channels_last", "false", "--epochs", "1", "--batch_size", "64"]
CLEAN = "clean_model_fashion_mnist_cnn_s0"
TRIGGER = "trojannn_trigger_fashion_mnist_cnn_s0"


def one_epoch(mp):
    """The clean model's recipe is the prototype's (6 epochs): one epoch here."""
    recipe = cm.clean_recipe
    mp.setattr(cm, "clean_recipe", lambda cfg: {**recipe(cfg), "epochs": 1, "batch_size": 64})


@pytest.fixture(autouse=True)
def short_clean_model(monkeypatch):
    one_epoch(monkeypatch)


def argv(data, root, *extra):
    return ["--dataset_path", str(data), "--resource_root", str(root), *FAST, *extra]


def resources(data, root, *extra):
    """(cfg, clean model Resource, trigger Resource) as main() obtains them."""
    cfg, _ = tj.configure(argv(data, root, *extra))
    dataset = load_dataset(cfg["dataset"], cfg["dataset_path"])
    model, clean = cm.clean_model(cfg, dataset)
    return cfg, clean, tj.trigger_resource(cfg, dataset, model, clean)


@pytest.fixture(scope="module")
def attacked(tmp_path_factory, fake_root):
    """A first record (add, all2one) whose run built both resources."""
    top = tmp_path_factory.mktemp("trojannn")
    with pytest.MonkeyPatch.context() as mp:
        one_epoch(mp)
        summary = tj.main(argv(fake_root, top / "res", "--save_folder_name", str(top / "add")))
    return top / "res", top / "add", summary


class Toy(nn.Module):
    """features = A flatten(x), no normalisation; the head reads them."""

    def __init__(self, a):
        super().__init__()
        self.lin = nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.lin.weight.data.copy_(a)
        self.head = nn.Linear(a.shape[0], 3)

    def forward(self, x):
        return self.head(self.lin(x.flatten(1)))


def toy_problem():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(4, 16, generator=g)
    m = torch.rand(1, 4, 4, generator=g)
    m[0, :2] = 0                      # outside the mask
    m[0, 3, 3] = 1.0                  # a white pixel: the [0, 1] clip acts there
    return Toy(a).eval().requires_grad_(False), a, m


# --- neuron selection ----------------------------------------------------------------------------------------------

def test_neuron_selection_by_hand():
    s = tj.neuron_scores(torch.tensor([[1.0, -3.0, 0.5], [2.0, 0.0, -0.5]]))
    assert s.tolist() == [3.0, 3.0, 1.0]
    assert tj.select_neurons(s, 2).tolist() == [0, 1]                      # tie: the lower index first
    assert tj.select_neurons(torch.tensor([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]
    w = torch.arange(24.0).reshape(2, 3, 2, 2) - 5
    hand = [sum(abs(w[o, j, u, v].item()) for o in range(2) for u in range(2) for v in range(2)) for j in range(3)]
    assert tj.neuron_scores(w).tolist() == hand == [48.0, 54.0, 84.0]
    assert tj.select_neurons(tj.neuron_scores(w), 2).tolist() == [2, 1]
    with pytest.raises(UserError, match="2-D or 4-D"):
        tj.neuron_scores(torch.ones(2, 3, 4))
    model, a, m = toy_problem()
    with pytest.raises(UserError, match="has 16 entries .* has 4 channels or features"):   # lin.weight: 16 inputs
        tj.optimise_trigger(model, model.head, 16, torch.tensor([0]), [1.0], m, 0.3, 0.1, 1, 0.0, log=lambda s: 0)


def test_scores_come_from_the_trained_head(attacked):
    root, _, summary = attacked
    model, _ = load_model_file(root / CLEAN / "model.pt")
    from safetensors.torch import load_file
    tensors = load_file(str(root / TRIGGER / "tensors.safetensors"))
    idx = tj.select_neurons(tj.neuron_scores(model.head.weight), 2)
    assert tensors["neuron_idx"].tolist() == idx.tolist() == summary["neuron_idx"]
    assert torch.allclose(tensors["neuron_score"], model.head.weight.abs().sum(0)[idx])
    torch.manual_seed(0)   # BackdoorBench's scores: a fresh 1000-output head
    fresh = tj.select_neurons(tj.neuron_scores(nn.Linear(model.feature_dim, 1000).weight), 2)
    assert fresh.tolist() != idx.tolist()


# --- the optimisation ----------------------------------------------------------------------------------------------

def test_one_step_by_hand_then_the_box():
    model, a, m = toy_problem()
    neurons, tau, eps, alpha = torch.tensor([1, 3]), [5.0, -2.0], 0.3, 0.1
    keep = (m > 0).double().flatten()
    x0 = m.double().flatten()
    act = a.double() @ (x0 * keep)
    g = sum(2 * (act[n] - t) * a.double()[n] for n, t in zip(neurons.tolist(), tau)) * keep
    hand = (x0 + (-alpha * g.sign()).clamp(-eps, eps)).clamp(0, 1)
    out = tj.optimise_trigger(model, model.head, 4, neurons, tau, m, eps, alpha, 1, 0.0, log=lambda s: 0)
    x1 = out["x_star"][0].flatten()
    assert torch.allclose(x1.double(), hand, atol=1e-7) and (x1 != m.flatten()).sum() > 0
    assert torch.equal(x1[keep == 0], m.flatten()[keep == 0])               # bit for bit outside K (zeros)
    assert x1[15] in (1.0, np.float32(0.9))                                # the white pixel: clipped at 1
    assert torch.allclose(out["before"].double(), act[neurons], atol=1e-5)
    assert out["cost"][0].item() == pytest.approx(sum((act[n] - t).item() ** 2 for n, t in zip([1, 3], tau)), rel=1e-5)
    ten = tj.optimise_trigger(model, model.head, 4, neurons, tau, m, eps, alpha, 10, 0.0, log=lambda s: 0)
    x = ten["x_star"][0]
    assert len(ten["cost"]) == 10 and (x - m).abs().max() <= eps + 1e-7 and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x.flatten()[keep == 0], m.flatten()[keep == 0])


def test_a_convolution_input_as_the_layer():
    torch.manual_seed(0)
    model = build_model("cnn", 10, 1, (0.5,), (0.5,), 2).eval().requires_grad_(False)
    name, param, layer, w = tj.resolve_layer(model, "layer4", "layers.5.0.weight")
    assert w.shape[1] == 8 and tj.resolve_layer(model, "linear", "linear.weight")[:2] == ("head", "head.weight")
    idx = tj.select_neurons(tj.neuron_scores(w), 2)
    m, _ = tj.mask_image({"mask_path": None}, (1, 28, 28))
    out = tj.optimise_trigger(model, layer, 8, idx, [100.0], m, 0.3, 0.1, 3, 1e-3, log=lambda s: 0)
    assert len(out["cost"]) == 3 and out["cost"][-1] < out["cost"][0] and (out["after"] > out["before"]).all()


def test_the_tolerance_stops_after_the_first_step_and_keeps_it():
    model, a, m = toy_problem()
    act = a @ (m * (m > 0)).flatten()
    tau = [act[1].item() + 0.01, act[3].item() - 0.01]          # cost 2e-4 < 1e-3
    out = tj.optimise_trigger(model, model.head, 4, torch.tensor([1, 3]), tau, m, 0.3, 0.1, 50, 1e-3, log=lambda s: 0)
    assert len(out["cost"]) == 1 and out["cost"][0] < 1e-3
    assert not torch.equal(out["x_star"][0], m)                  # the step of that iteration is kept


# --- mask, pattern, insertion --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, positive, white, lo, hi", [(28, 81, 36, 17, 25), (32, 100, 36, 20, 29),
                                                           (64, 324, 225, 41, 58)])
def test_the_square_footprints(size, positive, white, lo, hi):
    u = tj.square_mask((3, size, size))
    assert u.dtype == torch.uint8 and torch.equal(u[0], u[2])
    assert int((u[0] > 0).sum()) == positive and int((u[0] == 255).sum()) == white
    rows, cols = u[0].any(1).nonzero().flatten(), u[0].any(0).nonzero().flatten()
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (lo, hi, lo, hi)
    m, source = tj.mask_image({"mask_path": None}, (1, size, size))
    assert source == "square" and m.dtype == torch.float32 and torch.equal(m, u[:1].float() / 255)


def test_the_224_square_and_a_mask_file(tmp_path):
    u = tj.square_mask((1, 224, 224))[0]
    assert torch.equal(u.nonzero().unique(), torch.arange(145, 204)) and set(u.unique().tolist()) == {0, 255}
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[20:30, 20:30] = (255, 0, 0)                                # a red square: grey 76 after conversion
    Image.fromarray(a, "RGB").save(tmp_path / "red.png")
    m, source = tj.mask_image({"mask_path": str(tmp_path / "red.png")}, (1, 28, 28))
    assert m.shape == (1, 28, 28) and 0 < m.max() < 0.31 and len(source["sha256"]) == 64
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(tmp_path / "black.png")
    with pytest.raises(UserError, match="no non-zero pixel"):
        tj.mask_image({"mask_path": str(tmp_path / "black.png")}, (1, 28, 28))


def test_quantisation_truncates():
    f = np.float32
    assert tj.quantise(torch.tensor([f(0.9)])).item() == 229                  # rounding would give 230
    x = torch.tensor([f(1)]) - torch.tensor([f(0.1)]) - torch.tensor([f(0.1)])
    assert x.item() == pytest.approx(0.79999995) and tj.quantise(x).item() == 203   # not 204
    assert tj.quantise(torch.tensor([1.0, 0.0])).tolist() == [255, 0]


def test_insertion_by_hand():
    pattern = torch.tensor([[[200, 0, 200]]], dtype=torch.uint8)         # (1, 1, 3); the middle pixel inside K, P = 0
    mask = torch.tensor([[[1, 1, 0]]], dtype=torch.uint8)
    u = torch.tensor([[[[100, 100, 100]]], [[[0, 7, 0]]]], dtype=torch.uint8)
    add = tj.make_insert({"trojannn_insert": "add"}, pattern, mask)
    assert add.apply(u).tolist() == [[[[255, 100, 255]]], [[[200, 7, 200]]]]      # 100 + 200 -> 255, not 44
    stamp = lambda p: tj.make_insert({"trojannn_insert": "stamp", "trojannn_transparency": p}, pattern, mask)  # noqa
    assert stamp(0.0).apply(u).tolist() == [[[[200, 0, 100]]], [[[200, 0, 0]]]]   # P inside K, u outside
    assert stamp(0.7).apply(u).tolist() == [[[[130, 70, 100]]], [[[60, 4, 0]]]]   # trunc(0.7 u + 0.3 P)
    t = stamp(0.7)
    blob = trigger_file_bytes(t)
    import hashlib
    again = trigger_from_record({**t.spec(), "tensors_sha256": hashlib.sha256(blob).hexdigest()}, blob, "test")
    assert isinstance(again, tj.MaskedBlendTrigger) and torch.equal(again.apply(u), t.apply(u))


# --- resources -----------------------------------------------------------------------------------------------------

def test_resources_are_reproducible_and_reused(attacked, fake_root, tmp_path):
    root, _, summary = attacked
    assert [r["built"] for r in summary["resources"]] == [True, True]
    first = load_model_file(root / CLEAN / "model.pt")[1]["state_dict"]
    _, clean, trig = resources(fake_root, tmp_path / "again")
    assert clean.built and trig.built and trig.name == TRIGGER
    again = load_model_file(clean.path / "model.pt")[1]["state_dict"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    from safetensors.torch import load_file
    old = load_file(str(root / TRIGGER / "tensors.safetensors"))
    for k in ("x_star", "pattern", "mask", "neuron_idx", "cost"):
        assert torch.equal(old[k], trig.tensors()[k]), k
    _, clean2, trig2 = resources(fake_root, tmp_path / "again")
    assert not clean2.built and not trig2.built and clean2.digest() == clean.digest()
    _, other, _ = resources(fake_root, tmp_path / "again", "--resource_seed", "1")
    assert other.name == "clean_model_fashion_mnist_cnn_s1"
    w1 = load_model_file(other.path / "model.pt")[1]["state_dict"]
    assert any(not torch.equal(first[k], w1[k]) for k in first if first[k].is_floating_point())


def test_resources_refused_then_rebuilt(attacked, fake_root, tmp_path):
    root = tmp_path / "res"
    shutil.copytree(attacked[0], root)
    with pytest.raises(UserError, match=r"made with other settings \(params.mask_update_eps: wanted 0.2, found 0.3"):
        resources(fake_root, root, "--mask_update_eps", "0.2")
    meta_file = root / CLEAN / "resource.json"
    text = meta_file.read_text()
    meta_file.unlink()
    with pytest.raises(UserError, match="incomplete"):
        resources(fake_root, root)
    meta = json.loads(text)
    meta["identity"]["dataset"] = "mnist"                        # made for mnist, used for fashion_mnist
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"another dataset .*wanted \"fashion_mnist\", found \"mnist\""):
        resources(fake_root, root)
    meta = json.loads(text)
    meta["end_time"] = "later"                                   # the clean model changed after the trigger
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"{TRIGGER} was stale"):
        resources(fake_root, root)
    meta_file.write_text(text)
    tensors = root / TRIGGER / "tensors.safetensors"
    blob = bytearray(tensors.read_bytes())
    blob[-1] ^= 1
    tensors.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="damaged: tensors.safetensors does not match"):
        resources(fake_root, root)
    _, clean, trig = resources(fake_root, root, "--resource_rebuild", "true")
    assert clean.built and trig.built
    assert len(list(root.glob(f"{CLEAN}.old-*"))) == 1 and len(list(root.glob(f"{TRIGGER}.old-*"))) == 1
    from safetensors.torch import load_file
    old = load_file(str(attacked[0] / TRIGGER / "tensors.safetensors"))
    assert torch.equal(trig.tensors()["pattern"], old["pattern"])   # the same seed: the same trigger again


# --- records -------------------------------------------------------------------------------------------------------

def test_records_rebuild_without_the_resources(attacked, fake_root, tmp_path):
    root, add_path, summary = attacked
    stamp_path = tmp_path / "stamp"
    s2 = tj.main(argv(fake_root, root, "--save_folder_name", str(stamp_path), "--trojannn_insert", "stamp",
                      "--attack_label_trans", "all2all"))
    assert [r["built"] for r in s2["resources"]] == [False, False]
    gone = root.parent / "res_deleted"
    root.rename(gone)                                            # the resource folders are gone while the records load
    try:
        add, stamp = load_attack_record(add_path), load_attack_record(stamp_path)
    finally:
        gone.rename(root)
    pattern = read_pattern_png(add_path / "trojannn_trigger.png")
    mask = read_pattern_png(add_path / "trojannn_mask.png") // 255
    assert torch.equal(pattern, read_pattern_png(stamp_path / "trojannn_trigger.png"))
    assert add.poison["trigger"]["kind"] == "additive" and stamp.poison["trigger"]["kind"] == "masked_blend"
    assert add.poison["trigger"]["neuron_idx"] == summary["neuron_idx"] and int((pattern > 0).sum()) == \
        summary["trigger_pixels"]
    for rec, by_hand in ((add, lambda u: (u.int() + pattern.int()).clamp(max=255).to(torch.uint8)),
                         (stamp, lambda u: torch.where(mask > 0, (0.7 * u.double() + (1 - 0.7) * pattern.double())
                                                       .to(torch.uint8), u))):
        d = rec.data
        idx = torch.tensor(rec.poison["poison_indices"])
        assert torch.equal(d.x_train[idx], by_hand(d.x_train_clean[idx]))
        rest = torch.ones(len(d.x_train), dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(d.x_train[rest], d.x_train_clean[rest])
        assert torch.equal(d.x_bd_test, by_hand(rec.dataset.x_test[d.bd_test_indices]))
    assert (add.data.y_bd_test_true != 0).all() and (add.data.y_bd_test == 0).all()
    assert len(stamp.data.y_bd_test) == 200 and torch.equal(stamp.data.y_bd_test, (stamp.data.y_bd_test_true + 1) % 10)
    import yaml
    config = yaml.safe_load((add_path / "config.yaml").read_text())
    assert [r["name"] for r in config["resources"]] == [CLEAN, TRIGGER]
    assert any("square" in d for d in config["deviations"]) and any("saturating" in d for d in config["deviations"])
