"""LF (docs/specs/lf.md §9): the filter's kernel and hand responses, the normalisation to exactly [0, xi], targeted
DeepFool on a linear model against its closed form, the search's stop rules and guards, the resources (reproducible
from the seed, reused, refused when made for something else, stale or damaged), the record rebuilt bit for bit
without them, the insertion's hand values, and the BackdoorBench .npy import."""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from attack import lf
from utils.data import load_dataset
from utils.errors import UserError
from utils.lf_pattern import (SearchSettings, gaussian_kernel, normalise, predict_labels, search_pattern, smooth,
                              targeted_deepfool)
from utils.record import load_attack_record
from utils.resources import file_digest
from utils.triggers import AdditiveTrigger


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-image DeepFool steps are latency-bound: on the shared test cores one thread is many times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- the filter and the normalisation (§5.4) ------------------------------------------------------------------

def test_the_kernel_of_sigma_6_and_the_taps_rule(fake_root):
    w = gaussian_kernel(6.0)
    assert w.dtype == torch.float32 and len(w) == 30
    assert abs(w[0] - 0.0036303) < 1e-6 and w[0] == w[29] and abs(w[14] - 0.0670863) < 1e-6 and w[14] == w[15]
    assert abs(float(w.double().sum()) - 1) < 1e-6
    ref = np.exp(-(np.arange(30) - 14.5) ** 2 / 72)
    assert np.abs(w.numpy() - ref / ref.sum()).max() < 1e-8
    assert len(gaussian_kernel(1.0)) == 5
    with pytest.raises(UserError, match="lf_sigma = 1.3 .*5 \\* lf_sigma an integer"):
        lf.configure(["--dataset_path", str(fake_root), "--lf_sigma", "1.3"])


def by_hand(a: np.ndarray, w: np.ndarray, i: int, j: int) -> float:
    """S(a)[i, j] written out: sum_kl w_k w_l a[i + k - 14, j + l - 14], zero outside (float64)."""
    t, h, wd = len(w), *a.shape
    s = 0.0
    for k in range(t):
        for m in range(t):
            r, c = i + k - (t - 1) // 2, j + m - (t - 1) // 2
            if 0 <= r < h and 0 <= c < wd:
                s += w[k] * w[m] * a[r, c]
    return s


def test_the_filter_hand_values_and_channels():
    w = gaussian_kernel(6.0)
    out = smooth(torch.ones(1, 32, 32), w)
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32
    assert abs(out[0, 0, 0] - 0.32158685) < 1e-6 and abs(out[0, 31, 31] - 0.25000003) < 1e-6
    assert abs(out[0, 16, 16] - 1.0) < 1e-6
    assert abs(smooth(torch.ones(1, 28, 28), w)[0, 14, 14] - 0.98211) < 1e-5
    imp = torch.zeros(3, 32, 32)
    imp[0, 16, 16], imp[1, 5, 20], imp[2, 30, 2] = 1, 2, 3
    out = smooth(imp, w)
    peak = out[0].max()
    assert abs(peak - 0.0045005707) < 1e-8 and abs(peak - w[14] * w[15]) < 1e-9
    assert sorted(map(tuple, (out[0] == peak).nonzero().tolist())) == [(15, 15), (15, 16), (16, 15), (16, 16)]
    for c in range(3):                                       # each channel alone
        assert torch.allclose(out[c:c + 1], smooth(imp[c:c + 1], w), atol=0, rtol=0)
    a = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))
    got = smooth(a, w)[0]
    for i, j in [(0, 0), (3, 20), (27, 27), (14, 5)]:
        assert abs(float(got[i, j]) - by_hand(a[0].double().numpy(), w.double().numpy(), i, j)) < 1e-6
    assert torch.allclose(smooth(a[None], w)[0], smooth(a, w), atol=0, rtol=0)   # batched = one by one


def test_the_normalisation_spans_exactly_0_to_xi_and_refuses_a_constant():
    g = torch.Generator().manual_seed(1)
    for xi in (0.2, 0.05, 1.0):
        a = torch.randn(3, 9, 7, generator=g) * 3 + 1
        v = normalise(a, xi)
        assert v.min() == 0 and v.max() == torch.tensor(xi, dtype=torch.float32) and v.dtype == torch.float32
    assert normalise(torch.full((1, 4, 4), 0.7), 0.2) is None and normalise(torch.zeros(1, 4, 4), 0.2) is None


# --- targeted DeepFool (§5.6) ----------------------------------------------------------------------------------

def linear(weight, bias):
    m = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        m[1].weight.copy_(weight)
        m[1].bias.copy_(bias)
    return m.eval()


def test_one_deepfool_step_on_a_linear_model_is_the_closed_form():
    g = torch.Generator().manual_seed(2)
    W, c = torch.randn(2, 64, generator=g), torch.randn(2, generator=g)
    model = linear(W, c)
    z0 = torch.rand(1, 8, 8, generator=g)
    ell = int(model(z0[None]).argmax())
    t = 1 - ell
    r, i, end = targeted_deepfool(model, z0, t, 0.02, 200)
    W64, x = W.double(), z0.double().flatten()
    d = (W64[t] - W64[ell]) @ x + (c[t] - c[ell]).double()
    gr = W64[t] - W64[ell]
    ref = 1.02 * d.abs() * gr / gr.pow(2).sum()
    assert i == 1 and end == t and r.dtype == torch.float32
    assert torch.allclose(r.double().flatten(), ref, atol=1e-6, rtol=1e-5)
    r0, i0, end0 = targeted_deepfool(model, z0, ell, 0.02, 200)   # already the target
    assert i0 == 0 and end0 == ell and not r0.any()
    flat = linear(torch.zeros(2, 64), torch.tensor([1.0, 0.0]))  # no gradient: never converges, never NaN
    rz, iz, endz = targeted_deepfool(flat, z0, 1, 0.02, 7)
    assert iz == 7 and endz == 0 and not rz.any()


# --- the search loop (§5.5) -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 64, generator=g)
    model = linear((w - w.mean(1, keepdim=True)) * 4, torch.zeros(3))   # zero-mean rows: all classes predicted
    return model, torch.rand(8, 1, 8, 8, generator=g), torch.rand(6, 1, 8, 8, generator=g)


def run_toy(toy, seed=5, **kw):
    model, xs, xv = toy
    settings = SearchSettings(**{"target": 0, "sigma": 1.0, "xi": 0.5, **kw})
    return search_pattern(model, xs, xv, settings, torch.Generator().manual_seed(seed), log=lambda s: None)


def test_each_stop_reason_and_the_keep_rule(toy):
    goal = run_toy(toy, delta=0.99, max_passes=5)
    assert goal.stop_reason == "fooling_goal" and len(goal.rows) == 1 and goal.rows[0]["fooling_rate"] >= 0.01
    flat = run_toy(toy, delta=0.0001, plateau_passes=2, plateau_tol=1.01, max_passes=9)
    assert flat.stop_reason == "plateau" and len(flat.rows) == 2
    most = run_toy(toy, delta=0.0001, plateau_tol=0.0, max_passes=4, xi=0.2)
    assert most.stop_reason == "max_passes" and len(most.rows) == 4 and most.kept_pass == 4
    for r in (goal, flat, most):
        assert r.v.min() == 0 and r.v.max() == torch.tensor(r.v.max().item()) and bool(torch.isfinite(r.v).all())
        assert r.counts["updates"] == sum(row["updates"] for row in r.rows) > 0
    best = run_toy(toy, delta=0.0001, plateau_tol=0.0, max_passes=5, keep="best")
    frs = [row["fooling_rate"] for row in best.rows]
    assert frs[0] == frs[1] == frs[2] > frs[4] and best.kept_pass == 3               # the later one on ties
    again = run_toy(toy, delta=0.0001, plateau_tol=0.0, max_passes=3)
    assert torch.equal(again.v, best.v)


def test_a_target_predicted_first_image_gives_no_nan_and_no_update_at_all_fails(toy):
    model, xs, xv = toy
    first = int(torch.randperm(8, generator=torch.Generator().manual_seed(5))[0])
    w = model[1].weight.detach()
    xs = xs.clone()
    xs[first] = (0.5 + 0.5 * torch.sign(w[0] - w[1:].max(0).values)).view(1, 8, 8)   # strongly class 0
    assert int(predict_labels(model, xs[first:first + 1])[0]) == 0
    r = run_toy((model, xs, xv), max_passes=1)
    assert r.rows[0]["skipped_target"] >= 1 and bool(torch.isfinite(r.v).all()) and r.v.any()
    always_t = linear(torch.zeros(3, 64), torch.tensor([5.0, 0.0, 0.0]))
    with pytest.raises(UserError, match="made no update in 2 passes"):
        run_toy((always_t, xs, xv), max_passes=2)


# --- the insertion (§6, §9 row 8) -------------------------------------------------------------------------------

def test_insertion_hand_values():
    P = torch.zeros(1, 2, 3)
    P[0, 0, :] = 51.0
    P[0, 1, 0] = 12.7
    x = torch.tensor([[[[200, 204, 250], [100, 7, 9]]]], dtype=torch.uint8)
    out = AdditiveTrigger(P, P.clone()).apply(x, train=False)
    assert out.tolist() == [[[[251, 255, 255], [112, 7, 9]]]]
    g = torch.Generator().manual_seed(4)
    P = torch.rand(1, 28, 28, generator=g) * 51
    u = torch.randint(0, 256, (20, 1, 28, 28), generator=g, dtype=torch.uint8)
    expected = (u.long() + P.floor().long()).clamp(max=255).to(torch.uint8)      # min(255, u + floor(P))
    assert torch.equal(AdditiveTrigger(P, P.clone()).apply(u), expected)


# --- the attack and its resources ----------------------------------------------------------------------------------

def argv(fake_root, res, *extra):
    return ["--dataset", "fashion_mnist", "--dataset_path", str(fake_root), "--epochs", "1", "--batch_size", "64",
            "--model_width", "2", "--amp", "false", "--channels_last", "false", "--device", "cpu",
            "--lf_num_images", "8", "--lf_eval_per_class", "2", "--lf_max_iter_uni", "2", "--resource_root", str(res),
            *extra]


@pytest.fixture(scope="module")
def lf_run(one_thread, tmp_path_factory, fake_root):
    root = tmp_path_factory.mktemp("lf")
    summary = lf.main(argv(fake_root, root / "res", "--save_folder_name", str(root / "rec")))
    return root, summary


def obtain_again(fake_root, res, *extra):
    cfg, _, _ = lf.configure(argv(fake_root, res, *extra))
    return lf.searched_pattern(cfg, load_dataset("fashion_mnist", fake_root))


def test_the_record_and_the_resources(lf_run, fake_root):
    root, summary = lf_run
    res = root / "res" / "lf_fashion_mnist_cnn_t0_s0"
    clean = root / "res" / "clean_model_fashion_mnist_cnn_s0"
    files = {"tensors.safetensors", "passes.csv", "pattern.png", "log.txt", "resource.json"}
    assert files <= {p.name for p in res.iterdir()}
    meta = json.loads((res / "resource.json").read_text())
    assert meta["identity"]["upstream_clean_model"] == file_digest(clean / "resource.json")
    assert len(meta["search_indices"]) == 8 and len(meta["eval_indices"]) == 20
    assert not set(meta["search_indices"]) & set(meta["eval_indices"]) and meta["passes"] <= 2
    assert len((res / "passes.csv").read_text().splitlines()) == meta["passes"] + 1
    assert summary["resource_reused"] is False and summary["lf_fooling_rate"] == meta["fooling_rate"]
    assert json.loads((root / "rec" / "summary.json").read_text())["search_seconds"] == meta["search_seconds"]
    poison = json.loads((root / "rec" / "poison.json").read_text())
    assert poison["trigger"]["kind"] == "additive" and set(poison["trigger"]["resources"]) == {res.name, clean.name}
    assert (root / "rec" / "lf_pattern.png").exists()
    from safetensors.torch import load_file
    t = load_file(str(res / "tensors.safetensors"))
    assert t["v"].min() == 0 and t["v"].max() == torch.tensor(0.2) and torch.equal(t["P"], t["v"] * 255)
    # reused the second time, and the record rebuilds every poisoned image with the resource folders gone
    P, _, used, figures = obtain_again(fake_root, root / "res")
    assert [r.built for r in used] == [False, False] and figures["resource_reused"] is True and torch.equal(P, t["P"])
    shutil.move(root / "res", root / "res_aside")
    try:
        rec = load_attack_record(root / "rec")
    finally:
        shutil.move(root / "res_aside", root / "res")
    idx = torch.tensor(poison["poison_indices"])
    assert len(idx) == 60 and (rec.data.y_train[idx] == 0).all()
    assert torch.equal(rec.data.x_train[idx], (rec.data.x_train_clean[idx].long() + t["P"].floor().long())
                       .clamp(max=255).to(torch.uint8))
    assert (rec.data.y_bd_test_true != 0).all()


def test_the_search_is_reproducible_from_its_seed(lf_run, fake_root, tmp_path):
    root, _ = lf_run
    shutil.copytree(root / "res" / "clean_model_fashion_mnist_cnn_s0", tmp_path / "clean_model_fashion_mnist_cnn_s0")
    P, _, used, _ = obtain_again(fake_root, tmp_path)
    assert [r.built for r in used] == [False, True]
    name = "lf_fashion_mnist_cnn_t0_s0"
    tensors = "tensors.safetensors"
    assert (tmp_path / name / tensors).read_bytes() == (root / "res" / name / tensors).read_bytes()
    first = json.loads((root / "res" / name / "resource.json").read_text())
    second = json.loads((tmp_path / name / "resource.json").read_text())
    assert first["identity"] == second["identity"] and first["search_indices"] == second["search_indices"]
    # another resource seed draws other images (the search alone, on the same clean model)
    cfg, _, _ = lf.configure(argv(fake_root, tmp_path))
    model, _ = lf.clean_model(cfg, load_dataset("fashion_mnist", fake_root))
    (tmp_path / "s1").mkdir()
    other = lf.build_pattern(tmp_path / "s1", model, load_dataset("fashion_mnist", fake_root), cfg, 1,
                             torch.device("cpu"))
    assert other["search_indices"] != first["search_indices"]
    cfg_t, _, _ = lf.configure(argv(fake_root, tmp_path, "--lf_eval_split", "test"))   # BackdoorBench's intent
    (tmp_path / "t").mkdir()
    on_test = lf.build_pattern(tmp_path / "t", model, load_dataset("fashion_mnist", fake_root), cfg_t, 0,
                               torch.device("cpu"))
    assert on_test["eval_split"] == "test" and len(on_test["eval_indices"]) == 20
    assert on_test["search_indices"] == first["search_indices"] and on_test["eval_indices"] != first["eval_indices"]
    # another target is another resource
    _, _, used, _ = obtain_again(fake_root, tmp_path, "--attack_target", "1")
    assert used[1].name == "lf_fashion_mnist_cnn_t1_s0" and used[1].built


def edit_json(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("case, message", [
    ("dataset", "made for another dataset or other training data .*train_labels_sha256"),
    ("sigma", "made with other settings \\(params.lf_sigma: wanted 6.0, found 5.0"),
    ("stale", "stale: a resource it was built from changed \\(upstream_clean_model"),
    ("tampered", "is damaged: tensors.safetensors does not match its digest"),
    ("incomplete", "is incomplete \\(no resource.json"),
])
def test_a_resource_made_for_something_else_is_refused(lf_run, fake_root, tmp_path, case, message):
    root, _ = lf_run
    shutil.copytree(root / "res", tmp_path / "res")
    res, clean = tmp_path / "res" / "lf_fashion_mnist_cnn_t0_s0", tmp_path / "res" / "clean_model_fashion_mnist_cnn_s0"
    if case == "dataset":
        edit_json(res / "resource.json", lambda d: d["identity"].update(train_labels_sha256="0" * 64))
    elif case == "sigma":
        edit_json(res / "resource.json", lambda d: d["identity"]["params"].update(lf_sigma=5.0))
    elif case == "stale":     # the clean model's resource.json changed: its digest is no longer the recorded one
        edit_json(clean / "resource.json", lambda d: d.update(test_acc=0.5))
    elif case == "tampered":
        b = bytearray((res / "tensors.safetensors").read_bytes())
        b[-1] ^= 1
        (res / "tensors.safetensors").write_bytes(bytes(b))
    else:
        (res / "resource.json").unlink()
    with pytest.raises(UserError, match=f"{res}.*{message}" if case != "tampered" else message) as e:
        lf.main(argv(fake_root, tmp_path / "res", "--save_folder_name", str(tmp_path / "rec")))
    assert str(res) in str(e.value) and "--resource_rebuild" in str(e.value)
    assert not (tmp_path / "rec").exists()                    # refused before anything of the attack is written


# --- the import (§2) ------------------------------------------------------------------------------------------

def test_the_npy_import_layouts_and_refusals(tmp_path, fake_root):
    g = np.random.default_rng(0)
    hwc = g.integers(0, 52, (32, 32, 3)).astype(np.uint8)
    np.save(tmp_path / "a.npy", hwc)
    p, meta = lf.import_pattern(tmp_path / "a.npy", (3, 32, 32), 1.0)
    assert p.dtype == torch.float32 and torch.equal(p, torch.from_numpy(hwc.transpose(2, 0, 1).astype(np.float32)))
    assert meta["file_shape"] == [32, 32, 3] and len(meta["file_sha256"]) == 64
    flt = (g.random((1, 32, 32, 3)) * 0.2).astype(np.float32)
    np.save(tmp_path / "b.npy", flt)
    with pytest.raises(UserError, match="less than one grey level.*--lf_pattern_scale 255"):
        lf.import_pattern(tmp_path / "b.npy", (3, 32, 32), 1.0)
    p, _ = lf.import_pattern(tmp_path / "b.npy", (3, 32, 32), 255.0)
    assert torch.equal(p, torch.from_numpy((flt[0].astype(np.float64) * 255).astype(np.float32).transpose(2, 0, 1)))
    grey = g.integers(0, 52, (32, 32)).astype(np.uint8)
    np.save(tmp_path / "c.npy", grey)
    p, _ = lf.import_pattern(tmp_path / "c.npy", (3, 32, 32), 1.0)
    assert all(torch.equal(p[k], torch.from_numpy(grey.astype(np.float32))) for k in range(3))
    np.save(tmp_path / "d.npy", g.integers(0, 52, (28, 28)).astype(np.uint8))
    p_d, meta_d = lf.import_pattern(tmp_path / "d.npy", (1, 28, 28), 1.0)
    assert p_d.shape == (1, 28, 28)
    with pytest.raises(UserError, match=r"has shape \(32, 32, 3\); this dataset needs \(28, 28, 1\)"):
        lf.import_pattern(tmp_path / "a.npy", (1, 28, 28), 1.0)
    np.save(tmp_path / "e.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "f.npy").write_bytes(pickle.dumps(hwc))
    for f in ("e.npy", "f.npy"):
        with pytest.raises(UserError, match="not a plain .npy array"):
            lf.import_pattern(tmp_path / f, (3, 32, 32), 1.0)
    lf.main(argv(fake_root, tmp_path / "res", "--lowFrequencyPatternPath", str(tmp_path / "d.npy"),
                 "--save_folder_name", str(tmp_path / "rec")))
    rec = load_attack_record(tmp_path / "rec")
    poison = json.loads((tmp_path / "rec" / "poison.json").read_text())
    assert poison["trigger"]["source"] == "import" and poison["trigger"]["file_sha256"] == meta_d["file_sha256"]
    idx = torch.tensor(poison["poison_indices"])
    assert torch.equal(rec.data.x_train[idx], AdditiveTrigger(p_d, p_d.clone()).apply(rec.data.x_train_clean[idx]))
    assert not (tmp_path / "res").exists()                    # no resource is used
    with pytest.raises(UserError, match="has shape"):
        lf.configure(["--dataset_path", str(fake_root), "--lowFrequencyPatternPath", str(tmp_path / "a.npy")])


def test_all2all_relabels_y_plus_s_with_the_same_pattern(lf_run, fake_root, tmp_path):
    root, _ = lf_run
    lf.main(argv(fake_root, root / "res", "--attack_label_trans", "all2all", "--save_folder_name", str(tmp_path / "a")))
    rec = load_attack_record(tmp_path / "a")
    idx = torch.tensor(json.loads((tmp_path / "a" / "poison.json").read_text())["poison_indices"])
    assert torch.equal(rec.data.y_train[idx], (rec.data.y_train_true[idx] + 1) % 10)
    assert torch.equal(rec.data.y_bd_test, (rec.data.y_bd_test_true + 1) % 10)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["resource_reused"] is True
