"""Label-Consistent (docs/specs/lc.md §9) on tiny data (the fake 28x28 set, cnn width 2, one epoch, 2-3 PGD steps):
the corner sign map and its insertion by hand, the PGD bound and rounding, one PGD step by hand, batch
independence, the robust training's computation, resources reproducible, reused and refused, the clean-label plan,
the poisoned sets, and a record that rebuilds bit for bit with the resource folders deleted."""
import hashlib
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attack import lc
from models import build_model
from tests.conftest import synthetic_images, write_mnist_like
from utils.attack import clean_label_check
from utils.data import load_dataset
from utils.errors import UserError
from utils.model_file import read_model_file
from utils.poison import plan_poison
from utils.record import load_attack_record
from utils.record_names import read_record_config
from utils.robust_model import adversarial_examples

TINY = ["--amp", "false", "--channels_last", "false", "--model_width", "2", "--lc_surrogate_epochs", "1",
        "--adv_train_steps", "2", "--pgd_steps", "3", "--epochs", "1", "--batch_size", "64"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Width-2 models on 28x28 images run faster on one thread than on two, and do not stall when other processes
    share the cores; every build of this file runs with the same count, so the bit-for-bit comparisons hold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def argv(root, res, *extra):
    return ["--dataset", "fashion_mnist", "--dataset_path", str(root), "--resource_root", str(res), *TINY, *extra]


def resources(root, res, *extra):
    """(cfg, dataset, surrogate Resource, lc_pgd Resource, lc_pgd tensors), as main() obtains them."""
    cfg, _ = lc.configure(argv(root, res, *extra))
    dataset = load_dataset("fashion_mnist", root)
    model, sres = lc.surrogate(cfg, dataset, False)
    pres, pgd = lc.lc_pgd(cfg, dataset, model, sres, False)
    return cfg, dataset, sres, pres, pgd


@pytest.fixture(scope="module")
def lc_run(tmp_path_factory, fake_root):
    """One LC record (pratio 0.05 of the attacker's pool, a 10 % reserve) with its resources built on the way."""
    base = tmp_path_factory.mktemp("lc")
    res, path = base / "res", base / "lc_rec"
    summary = lc.main(argv(fake_root, res, "--save_folder_name", str(path), "--pratio", "0.05", "--reserve_ratio", "0.1"))
    return SimpleNamespace(base=base, res=res, path=path, summary=summary, root=fake_root)


def linear(k, shape, weight=None):
    """Flatten + linear head on the pixels: the gradient of CE is sum_k (p_k - [k = t]) W_k, by hand."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), k))
    if weight is not None:
        with torch.no_grad():
            m[1].weight.copy_(weight)
            m[1].bias.zero_()
    return m.eval()


def tiny_cnn():
    torch.manual_seed(0)
    return build_model("cnn", 10, 1, (0.5,), (0.5,), 2)


# --- 1, 2: the corner trigger ----------------------------------------------------------------------------------

def test_sign_map_by_hand_and_its_symmetries():
    v = lc.sign_map(32, 32)
    left = torch.tensor([[1, -1, -1], [-1, 1, -1], [1, -1, 1]], dtype=torch.int8)
    right = torch.tensor([[-1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=torch.int8)
    for rows in (slice(0, 3), slice(29, 32)):
        assert torch.equal(v[rows, 0:3], left) and torch.equal(v[rows, 29:32], right)
    assert int((v != 0).sum()) == 36 and int((v == 1).sum()) == 16
    assert torch.equal(v, v.flip(1)) and not torch.equal(v, v.flip(0))
    br = lc.sign_map(32, 32, "bottom-right")
    assert int((br != 0).sum()) == 9 and torch.equal(br[29:, 29:], right)
    v64 = lc.sign_map(64, 64)                                                # default scale 2 = nearest 2x resize
    assert int((v64 != 0).sum()) == 144 and torch.equal(v64, v.repeat_interleave(2, 0).repeat_interleave(2, 1))
    v28 = lc.sign_map(28, 28)                                                # native 3x3 blocks in the real corners
    assert int((v28 != 0).sum()) == 36 and torch.equal(v28, v28.flip(1))
    assert torch.equal(v28[25:, 25:], right) and torch.equal(v28[:3, :3], left)
    with pytest.raises(UserError, match="does not fit a 28x28.*1..4"):
        lc.sign_map(28, 28, scale=5)
    with pytest.raises(UserError, match="lc_trigger_scale 5"):
        lc.configure(["--dataset", "fashion_mnist", "--lc_trigger_scale", "5"])


@pytest.mark.parametrize("a, plus, minus", [(1.0, 255, 0), (32 / 255, 132, 68), (0.1, 125, 74)])
def test_insertion_by_hand(a, plus, minus):
    v = lc.sign_map(32, 32)
    trig = lc.LabelConsistentTrigger(torch.empty(0, dtype=torch.int64), torch.empty(0, 3, 32, 32, dtype=torch.uint8),
                                     lc.addend(v, 3, 1.0), lc.addend(v, 3, a))
    out = trig.apply(torch.full((2, 3, 32, 32), 100, dtype=torch.uint8), train=False)
    assert torch.equal(trig.delta_test, lc.addend(v, 3, a)) and trig.delta_test.dtype == torch.float32
    for ch in range(3):                       # 125 / 74 at a = 0.1 (d = +-25.5): truncation, not rounding
        assert (out[:, ch][:, v == 1] == plus).all() and (out[:, ch][:, v == -1] == minus).all()
        assert (out[:, ch][:, v == 0] == 100).all()
    lo, hi = (trig.apply(torch.full((1, 3, 32, 32), c, dtype=torch.uint8), train=False) for c in (0, 255))
    assert (lo[:, :, v == -1] == 0).all() and (hi[:, :, v == 1] == 255).all()         # the clip holds
    assert (lo[:, :, v == 1] == min(plus - 100 if a < 1 else 255, 255)).all()
    assert (hi[:, :, v == -1] == (255 - (100 - minus) if a < 1 else 0)).all()


def test_test_amplitude_changes_test_images_only():
    v = lc.sign_map(28, 28)
    img = torch.full((1, 1, 28, 28), 100, dtype=torch.uint8)
    trig = lc.LabelConsistentTrigger(torch.tensor([5]), img.clone(), lc.addend(v, 1, 1.0), lc.addend(v, 1, 32 / 255))
    assert int(trig.apply(img, torch.tensor([5]), train=True)[0, 0, 0, 0]) == 255
    assert int(trig.apply(img, torch.tensor([5]), train=False)[0, 0, 0, 0]) == 132
    with pytest.raises(ValueError, match="no perturbed image"):
        trig.apply(img, torch.tensor([6]), train=True)


# --- 3, 4, 5: the PGD ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [8, 16])
def test_pgd_bound_and_untouched_pixels(eps):
    g = torch.Generator().manual_seed(eps)
    u = torch.randint(0, 256, (6, 1, 28, 28), generator=g, dtype=torch.uint8)
    w = torch.randn(10, 784, generator=g)
    w.view(10, 28, 28)[:, :, :14] = 0                                     # the model ignores the left half
    out, before, after, loss = lc.pgd_perturb(linear(10, (1, 28, 28), w), u, 0, eps / 255, 3 / 255, 8, 4, "cpu")
    change = (out.int() - u.int()).abs()
    assert int(change.max()) == eps and torch.equal(out[..., :14], u[..., :14])
    assert before.shape == after.shape == loss.shape == (6,) and loss.dtype == torch.float32
    out, *_ = lc.pgd_perturb(tiny_cnn().eval(), u, 3, eps / 255, eps / 2 / 255, 3, 4, "cpu")
    assert int((out.int() - u.int()).abs().max()) <= eps


def test_rounding_where_truncation_loses_a_grey_level():
    # w_0 = 0, w_1 < 0: for t = 0 the gradient is p_1 w_1 < 0 on every pixel; one large step hits -eps
    w = torch.stack([torch.zeros(784), torch.full((784,), -1e-3)])
    u = torch.full((1, 1, 28, 28), 24, dtype=torch.uint8)
    out, *_ = lc.pgd_perturb(linear(2, (1, 28, 28), w), u, 0, 8 / 255, 16 / 255, 1, 1, "cpu")
    x = (u.float() / 255 + torch.tensor(-8 / 255).clamp(-8 / 255, 8 / 255)).clamp(0, 1)
    assert int((x * 255).to(torch.uint8)[0, 0, 0, 0]) == 15                 # BackdoorBench's cast: u - 9
    assert (out == 16).all()                                               # rounded: u - 8, within the bound


def test_one_pgd_step_by_hand():
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 256, (3, 1, 28, 28), generator=g, dtype=torch.uint8)
    w = torch.randn(10, 784, generator=g)
    alpha, eps = 2 / 255, 8 / 255
    out, *_ = lc.pgd_perturb(linear(10, (1, 28, 28), w), u, 4, eps, alpha, 1, 3, "cpu")
    x0 = u.double().flatten(1) / 255
    p = torch.softmax(x0 @ w.double().T, 1)
    grad = (p - torch.nn.functional.one_hot(torch.tensor(4), 10).double()) @ w.double()   # sum_k (p_k - [k = t]) W_k
    x1 = (x0 + alpha * grad.sign()).clamp(0, 1)
    assert torch.equal(out.flatten(1), torch.round(x1 * 255).to(torch.uint8))


def test_each_image_depends_on_itself_only():
    cnn = tiny_cnn().eval()
    u = torch.randint(0, 256, (14, 1, 28, 28), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    a, *_ = lc.pgd_perturb(cnn, u, 0, 8 / 255, 2 / 255, 3, 4, "cpu")
    b, *_ = lc.pgd_perturb(cnn, u, 0, 8 / 255, 2 / 255, 3, 7, "cpu")
    assert (a != b).float().mean() < 0.01      # equal, up to a sign flipped by floating-point batch differences


# --- the robust surrogate (§5.1) ----------------------------------------------------------------------------------

def test_adversarial_training_step_by_hand():
    # two classes, y = 0: the input gradient is p_1 (w_1 - w_0) whatever x, so with alpha >= 2 eps one step lands on
    # eps sign(w_1 - w_0) from any random start, then the image range clips it
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 784, generator=g) * 1e-3       # logits near 0: p_0 - 1 = -p_1 holds in float32 too
    model = linear(2, (1, 28, 28), w).train()
    x = torch.rand(5, 1, 28, 28, generator=g)
    eps = 16 / 255
    xa = adversarial_examples(model, x, torch.zeros(5, dtype=torch.int64), eps, 2 * eps, 1, torch.Generator().manual_seed(0))
    want = (x + eps * (w[1] - w[0]).sign().view(1, 1, 28, 28)).clamp(0, 1)
    assert torch.allclose(xa, want, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())            # no parameter gradient accumulated
    cnn = tiny_cnn().train()
    xa = adversarial_examples(cnn, x, torch.arange(5), eps, 8 / 255, 2, torch.Generator().manual_seed(0))
    assert (xa - x).abs().max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert all(p.grad is None for p in cnn.parameters())


@pytest.fixture(scope="module")
def second_build(lc_run, tmp_path_factory, monkeypatch_module):
    """The same resources built again from the same seed in another root, counting the robust model's passes."""
    import utils.clean_model as rm   # the robust model is built by the shared start_training
    passes = []
    original = rm.build_model

    def counted(*a, **kw):
        m = original(*a, **kw)
        m.register_forward_pre_hook(lambda mod, inp: passes.append((mod.training, len(inp[0]))))
        return m
    monkeypatch_module.setattr(rm, "build_model", counted)
    res = tmp_path_factory.mktemp("lc2") / "res"
    out = resources(lc_run.root, res)
    monkeypatch_module.setattr(rm, "build_model", original)
    return SimpleNamespace(res=res, passes=passes, out=out)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_robust_training_runs_the_attack_in_train_mode_then_one_step(second_build):
    train = [n for training, n in second_build.passes if training]
    # the prototype's batches of 128 (not the attack's 64), drop_last: 4 batches x (2 attack passes + 1 step)
    assert train == [128] * (4 * 3)
    evals = [n for training, n in second_build.passes if not training]
    assert evals == [200] * (1 + 10 + 1)   # clean test accuracy, then PGD (10 steps) and its prediction
    meta = second_build.out[2].meta
    assert 0 <= meta["robust_test_acc"] <= 1 and meta["robust_test_n"] == 200
    assert meta["identity"]["params"] == {"adv_train_eps": 16.0, "adv_train_alpha": 8.0, "adv_train_steps": 2,
                                          "random_start": True}
    assert meta["identity"]["recipe"]["epochs"] == 1 and meta["identity"]["recipe"]["cos_t_max"] == 1


# --- 6, 7: resources --------------------------------------------------------------------------------------------

def test_resources_are_reproducible_and_reused(lc_run, second_build, capsys):
    a = read_model_file(lc_run.res / "robust_model_fashion_mnist_cnn_s0" / "model.pt")["state_dict"]
    b = read_model_file(second_build.res / "robust_model_fashion_mnist_cnn_s0" / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    pgd_a = lc_run.res / "lc_pgd_fashion_mnist_cnn_robust_t0_s0"
    cfg, dataset, sres, pres, pgd = resources(lc_run.root, lc_run.res)         # found, not built
    assert not sres.built and not pres.built and "reused" in capsys.readouterr().out
    assert torch.equal(pgd["images"], second_build.out[4]["images"]) and pres.path == pgd_a
    assert torch.equal(pgd["indices"], torch.nonzero(dataset.y_train == 0).flatten())
    assert (pgd["images"] != dataset.x_train[pgd["indices"]]).any()
    assert (pgd_a / "examples.png").exists() and "lc_pgd:" in (pgd_a / "log.txt").read_text()
    *_, other = resources(lc_run.root, second_build.res, "--resource_seed", "1")   # another surrogate
    assert not torch.equal(other["images"], pgd["images"])


def copy_of(res, tmp_path):
    dst = tmp_path / "res"
    shutil.copytree(res, dst)
    return dst


def test_resources_refused_when_incomplete_foreign_stale_or_damaged(lc_run, tmp_path):
    root = lc_run.root
    res = copy_of(lc_run.res, tmp_path)
    robust, pgd = res / "robust_model_fashion_mnist_cnn_s0", res / "lc_pgd_fashion_mnist_cnn_robust_t0_s0"
    # another label order: the same name, other training data
    xtr, ytr = synthetic_images(600, 0)
    other = write_mnist_like(tmp_path / "data", "fashion_mnist", xtr, ytr[::-1].copy(), *synthetic_images(200, 1))
    with pytest.raises(UserError, match="another dataset or other training data.*train_labels_sha256"):
        resources(other, res)
    # other PGD settings under the same name
    with pytest.raises(UserError, match="made with other settings.*params"):
        resources(root, res, "--pgd_batch_size", "7")
    # a damaged tensor file
    data = bytearray((pgd / "tensors.safetensors").read_bytes())
    data[-1] ^= 1
    (pgd / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged: tensors.safetensors does not match its digest"):
        resources(root, res)
    # the surrogate changed after lc_pgd was made (its resource.json, hence its digest, is another)
    shutil.rmtree(pgd)
    shutil.copytree(lc_run.res / pgd.name, pgd)
    meta = json.loads((robust / "resource.json").read_text())
    (robust / "resource.json").write_text(json.dumps({**meta, "end_time": "later"}))
    with pytest.raises(UserError, match="stale.*upstream_robust_model"):
        resources(root, res)
    # incomplete: no resource.json
    (robust / "resource.json").unlink()
    with pytest.raises(UserError, match="incomplete"):
        resources(root, res)


def test_another_target_has_its_own_resource_and_a_tampered_one_is_caught(lc_run, tmp_path):
    res = copy_of(lc_run.res, tmp_path)
    *_, pres, pgd = resources(lc_run.root, res, "--attack_target", "1")
    assert pres.built and pres.name == "lc_pgd_fashion_mnist_cnn_robust_t1_s0"
    # the target-1 images under the target-0 name, resource.json claiming t = 0: the labels of `indices` tell
    t0 = res / "lc_pgd_fashion_mnist_cnn_robust_t0_s0"
    shutil.rmtree(t0)
    shutil.copytree(pres.path, t0)
    meta = json.loads((t0 / "resource.json").read_text())
    meta["identity"]["params"]["target"] = 0
    (t0 / "resource.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not hold the class-0 images"):
        resources(lc_run.root, res)


# --- 8, 9, 10, 11: the plan, the poisoned sets, the record ----------------------------------------------------------

def test_clean_label_plan_and_its_refusals(lc_run, tmp_path, fake_root):
    poison = json.loads((lc_run.path / "poison.json").read_text())
    idx, reserve = torch.tensor(poison["poison_indices"]), torch.tensor(poison["reserve_indices"])
    dataset = load_dataset("fashion_mnist", fake_root)
    assert len(reserve) == 60 and len(idx) == round(0.05 * 540) and poison["clean_label"] is True
    assert (dataset.y_train[idx] == 0).all() and not set(idx.tolist()) & set(reserve.tolist())
    assert poison["target_class_size"] == 54 and poison["target_class_unpoisoned"] == 54 - len(idx)
    assert poison["trigger"]["poisoned_share_of_target_class"] == len(idx) / 60
    res = tmp_path / "res"
    with pytest.raises(UserError, match=r"target class 0 has 60 .*at most 0\.1000"):
        lc.main(argv(fake_root, res, "--save_folder_name", str(tmp_path / "x"), "--pratio", "0.2"))
    assert not res.exists() and not (tmp_path / "x").exists()            # refused before any resource is built
    with pytest.raises(UserError, match="all2one"):
        lc.configure(argv(fake_root, res, "--attack_label_trans", "all2all"))
    for bad in (["--reduced_amplitude", "0"], ["--reduced_amplitude_test", "1.5"], ["--pgd_eps", "0"],
                ["--pgd_steps", "0"], ["--adv_train_alpha", "-1"]):
        with pytest.raises(UserError, match="allowed"):
            lc.configure(argv(fake_root, res, *bad))


def test_poisoned_sets_are_the_pgd_images_with_the_corners(lc_run):
    rec = load_attack_record(lc_run.path)
    poison, d = rec.poison, rec.data
    idx = torch.tensor(poison["poison_indices"])
    pgd = load_pgd(lc_run.res)
    v = lc.sign_map(28, 28)
    want = pgd["images"][torch.searchsorted(pgd["indices"], idx)].clone()
    want[:, :, v == 1], want[:, :, v == -1] = 255, 0                      # amplitude 1: set and clear
    assert torch.equal(d.x_train[idx], want)
    assert torch.equal(d.y_train, d.y_train_true)                          # no label changed
    others = torch.ones(600, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(d.x_train[others], d.x_train_clean[others])
    keep = d.y_test != 0
    test = d.x_test[keep].clone()
    test[:, :, v == 1], test[:, :, v == -1] = 255, 0                       # test images: clean + corners, no PGD
    assert torch.equal(d.x_bd_test, test) and (d.y_bd_test == 0).all() and (d.y_bd_test_true != 0).all()
    config = read_record_config(lc_run.path)
    assert [r["name"] for r in config["resources"]] == ["robust_model_fashion_mnist_cnn_s0",
                                                         "lc_pgd_fashion_mnist_cnn_robust_t0_s0"]
    assert any("rounded half to even" in s for s in config["deviations"])
    assert (lc_run.path / "trigger_pattern.png").exists()
    header = (lc_run.path / "metrics.csv").read_text().splitlines()[0]
    assert "test_acc_target_class" in header and "test_asr_authors" in header
    s = lc_run.summary                                      # the resources and the PGD's effect, in the record
    assert [r["name"] for r in s["resources"]] == [r["name"] for r in config["resources"]]
    assert s["resources"][0]["built"] and s["surrogate_acc_perturbed_target"] == poison["trigger"][
        "surrogate_acc_perturbed_target"]
    log = (lc_run.path / "log.txt").read_text()
    assert "resource robust_model_fashion_mnist_cnn_s0: built" in log and f"lc: {len(idx)} of the 60 class-0" in log
    assert (lc_run.path / "trigger.png").stat().st_size > 0


def load_pgd(res):
    from safetensors.torch import load_file
    return load_file(str(res / "lc_pgd_fashion_mnist_cnn_robust_t0_s0" / "tensors.safetensors"))


def test_record_round_trip_without_the_resources(lc_run, tmp_path):
    from safetensors.torch import load, save
    rec_path = tmp_path / "rec"
    shutil.copytree(lc_run.path, rec_path)
    before = load_attack_record(lc_run.path).data
    hidden = tmp_path / "hidden"
    shutil.move(str(lc_run.res), hidden)                                   # the resource folders are gone
    try:
        after = load_attack_record(rec_path).data
        assert torch.equal(after.x_train, before.x_train) and torch.equal(after.x_bd_test, before.x_bd_test)
        poison = json.loads((rec_path / "poison.json").read_text())
        for key, change in (("train_images", "poisoned_train_sha256"), ("delta_test", "poisoned_test_sha256")):
            tensors = load((lc_run.path / "trigger.safetensors").read_bytes())
            tensors[key] = (tensors[key] + 1) if key == "train_images" else tensors[key] * 0.5   # an image, an amplitude
            blob = save(tensors)
            (rec_path / "trigger.safetensors").write_bytes(blob)
            poison["trigger"]["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
            (rec_path / "poison.json").write_text(json.dumps(poison))
            with pytest.raises(UserError, match=change):
                load_attack_record(rec_path)
        (rec_path / "trigger.safetensors").write_bytes(b"x" + blob)            # and altered without its digest
        with pytest.raises(UserError, match="altered"):
            load_attack_record(rec_path)
    finally:
        shutil.move(str(hidden), lc_run.res)


def test_warning_when_the_target_class_is_all_poisoned(fake_root, capsys):
    y = load_dataset("fashion_mnist", fake_root).y_train
    data = SimpleNamespace(train_indices=torch.arange(600), y_train_true=y)
    for pratio, warned in ((0.1, True), (0.05, False)):
        plan = plan_poison(y, 10, pratio, None, "all2one", 0, 1, 0.0, "random", 0, clean_label=True)
        out = clean_label_check(plan, data)
        assert ("warning: only" in capsys.readouterr().out) == warned
        assert out["target_class_unpoisoned"] == 60 - len(plan.poison_indices)


def test_an_interrupted_robust_build_resumes_to_the_same_weights(lc_run, tmp_path):
    from tests.conftest import killed_after_checkpoint
    two = ("--lc_surrogate_epochs", "2")
    whole = resources(lc_run.root, tmp_path / "a", *two)[2]
    with killed_after_checkpoint(lambda phase, epoch: epoch == 1):
        resources(lc_run.root, tmp_path / "b", *two)
    with pytest.raises(UserError, match="interrupted.*--resume"):
        resources(lc_run.root, tmp_path / "b", *two)
    cfg, _ = lc.configure(argv(lc_run.root, tmp_path / "b", *two))
    _, resumed = lc.surrogate(cfg, load_dataset("fashion_mnist", lc_run.root), True)
    a, b = (read_model_file(r.path / "model.pt")["state_dict"] for r in (whole, resumed))
    assert resumed.meta.get("resumed") and all(torch.equal(a[k], b[k]) for k in a)
