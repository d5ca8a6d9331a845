"""Adaptive-Blend and Adaptive-Patch (docs/specs/adaptive_blend.md §9, adaptive_patch.md §9): payload / cover
counts and draws, the piece masks keyed by index, the authors' float32 insertion and its rounding (ties included)
against an independent numpy reference, the four generated patches and their opacities, the test triggers, the
records rebuilt bit for bit with the cover samples kept out of the defenders' clean pool, and the refusals."""
import json

import numpy as np
import pytest
import torch

from attack import adaptive_blend as ab
from attack import adaptive_patch as ap
from tests.conftest import killed_after_checkpoint, make_record
from utils.adaptive_triggers import counts, plan_adaptive
from utils.errors import UserError
from utils.poison import build_poisoned_data, defender_clean_subset, plan_poison
from utils.record import load_attack_record
from utils.seeding import generator
from utils.triggers import trigger_file_bytes


def reference(u, p, m, a):
    """adaptive_blend.md §5.4 written out in numpy float32: x + fl32(a) M (p - x), then trunc(255 v + 0.5)."""
    f = np.float32
    x, q = u.astype(f) / f(255), p.astype(f) / f(255)
    v = x + (f(a) * m.astype(f)) * (q - x)
    return np.clip(v * f(255) + f(0.5), 0, 255).astype(np.uint8)


def blend_trigger(shape=(1, 28, 28), alpha=0.15, test_alpha=0.2, pieces=16, mask_rate=0.5, seed=0, pattern=None):
    p = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(5)).to(torch.uint8) if pattern is None \
        else pattern
    return ab.AdaptiveBlendTrigger(p, alpha, test_alpha, pieces, mask_rate, seed)


def cfg(**kw):
    return {"random_seed": 0, "attack_target": 0, "reserve_ratio": 0.0, "reserve_rule": "random", "pratio": 0.003,
            "p_num": None, "cover_rate": 0.003, "c_num": None, "cover_exclude_target": False,
            "attack_label_shift_amount": 1, **kw}


# --- counts and selection ---------------------------------------------------------------------------------------

def test_payload_and_cover_counts():
    assert counts(50_000, 0.003, None, 0.003, None) == (150, 150)
    assert counts(39_209, 0.003, None, 0.003, None) == (118, 118)
    assert counts(60_000, 0.01, None, 0.01, None) == (600, 600)
    assert counts(50_000, 0.003, None, 0.006, None) == (150, 300)          # adaptive_patch cifar10
    assert counts(39_209, 0.005, None, 0.01, None) == (196, 392)           # adaptive_patch gtsrb
    assert counts(50_000, 0.003, 7, 0.003, 9) == (7, 9)
    assert counts(50_000, 0.003, None, 0.0, None) == (150, 0)
    with pytest.raises(UserError, match=r"60 payload and 50 cover.*holds 100"):
        counts(100, 0.6, None, 0.5, None)
    y = torch.arange(10_000) % 10
    plan = plan_adaptive(y, 10, cfg(reserve_ratio=0.1, pratio=0.01, cover_rate=0.02))
    assert len(plan.reserve_indices) == 1000 and (len(plan.poison_indices), len(plan.cross_indices)) == (90, 180)


def test_selection_disjoint_sorted_reproducible_and_the_target_rule():
    y = torch.arange(10_000) % 10
    meta = {}
    plan = plan_adaptive(y, 10, cfg(reserve_ratio=0.1, pratio=0.01, c_num=1000), meta)
    p, c = plan.poison_indices, plan.cross_indices
    assert not torch.isin(p, c).any() and not torch.isin(torch.cat([p, c]), plan.reserve_indices).any()
    assert torch.equal(p, p.sort().values) and torch.equal(c, c.sort().values)
    same = plan_poison(y, 10, 0.01, None, "all2one", 0, 1, 0.1, "random", 0)   # the payload is plan_poison's draw
    assert torch.equal(same.poison_indices, p)
    assert torch.equal(plan_adaptive(y, 10, cfg(reserve_ratio=0.1, pratio=0.01, c_num=1000)).cross_indices, c)
    assert not torch.equal(plan_adaptive(y, 10, cfg(random_seed=1, pratio=0.01, c_num=1000)).cross_indices, c)
    assert 60 <= meta["cover_of_target_class"] <= 140 and meta["n_cover"] == 1000   # the default admits class t
    assert meta["conservatism"]["cover_over_payload"] == 1000 / 90 and meta["cover_indices"] == c.tolist()
    assert plan.label_trans == "all2one" and plan.poison_labels is None
    ex = plan_adaptive(y, 10, cfg(c_num=1000, cover_exclude_target=True)).cross_indices
    assert len(ex) == 1000 and (y[ex] != 0).all()
    with pytest.raises(UserError, match="non-target, non-payload"):
        plan_adaptive(y, 10, cfg(c_num=8990, cover_exclude_target=True))


# --- Adaptive-Blend: pieces, masks, insertion ---------------------------------------------------------------------

@pytest.mark.parametrize("shape,side", [((3, 32, 32), 8), ((1, 28, 28), 7), ((3, 64, 64), 16)])
def test_piece_geometry_and_half_hidden_masks(shape, side):
    t = blend_trigger(shape)
    assert (t.g, t.s_h, t.s_w, t.m) == (4, side, side, 8)
    m = t.masks(t.visible(torch.arange(50), "train"))
    assert m.shape == (50, 1, *shape[1:])
    assert ((m == 0).flatten(1).sum(1) == 8 * side * side).all()        # 512 / 392 / 2048 hidden pixels per channel
    blocks = m[:, 0].unfold(1, side, side).unfold(2, side, side)        # every piece all on or all off
    assert ((blocks.amin((-1, -2)) == blocks.amax((-1, -2)))).all()
    full, plain = blend_trigger(shape, mask_rate=0.0), blend_trigger(shape, 0.15, 0.15)   # mask_rate 0: no piece hidden
    x = torch.randint(0, 256, (4, *shape), dtype=torch.uint8)
    assert torch.equal(full.apply(x, torch.arange(4)), plain.apply(x, train=False))


def test_bad_geometry_and_options_are_refused(fake_root):
    with pytest.raises(UserError, match="perfect square"):
        blend_trigger(pieces=15)
    with pytest.raises(UserError, match="not divisible by 3"):
        blend_trigger(pieces=9)
    with pytest.raises(UserError, match="no piece would be planted"):
        blend_trigger(mask_rate=1.0)
    base = ["--dataset_path", str(fake_root)]
    for argv, msg in ((["--alpha", "1.5"], "alpha"), (["--pieces", "36"], "pieces"),
                      (["--attack_label_trans", "all2all"], "all2one"), (["--cover_rate", "1"], "cover_rate")):
        with pytest.raises(UserError, match=msg):
            ab.configure(base + argv)


def test_masks_are_keyed_by_index_and_seed():
    t = blend_trigger()
    x = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    idx = torch.arange(100, 120)
    whole = t.apply(x, idx)
    assert torch.equal(blend_trigger().apply(x[7:8], idx[7:8]), whole[7:8])   # alone or with the others
    assert not torch.equal(blend_trigger(seed=1).apply(x, idx), whole)
    assert not torch.equal(t.visible(idx, "train"), t.visible(idx, "test"))     # payload/cover vs test keys
    perm = torch.randperm(16, generator=generator(0, "adaptive_blend_pieces:train:105"))
    assert t.visible(idx[5:6], "train").item() == sum(1 << int(q) for q in perm[8:])


def test_insertion_hand_values_and_ties():
    def one(u, p, a, visible=True):
        t = blend_trigger((1, 28, 28), a, a, pattern=torch.full((1, 28, 28), p, dtype=torch.uint8), mask_rate=0)
        return int(t.apply(torch.full((1, 1, 28, 28), u, dtype=torch.uint8), train=False)[0, 0, 0, 0])
    assert (one(100, 200, 0.15), one(100, 200, 0.2), one(0, 255, 0.15)) == (115, 120, 38)
    assert (one(2, 7, 0.5), one(0, 1, 0.5), one(15, 0, 0.3), one(0, 10, 0.15)) == (4, 1, 10, 2)   # ties both ways
    t = blend_trigger()                                                  # hidden pixels keep every value
    x = torch.arange(256).repeat(4)[:784].view(1, 1, 28, 28).to(torch.uint8).repeat(8, 1, 1, 1)
    out, m = t.apply(x, torch.arange(8)), t.masks(t.visible(torch.arange(8), "train"))
    assert torch.equal(out[m.expand_as(x) == 0], x[m.expand_as(x) == 0])
    u, p = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")   # M = 1: round half up of the exact value
    for a, (num, den) in ((0.15, (3, 20)), (0.2, (1, 5)), (1.0, (1, 1))):
        exact = (2 * (den * u + num * (p - u)) + den) // (2 * den)
        assert np.array_equal(reference(u, p, np.ones_like(u), a), exact)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_training_test_and_cover_images_match_the_reference(shape):
    t = blend_trigger(shape)
    x = torch.randint(0, 256, (6, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    idx = torch.tensor([3, 9, 11, 40, 41, 77])
    m = t.masks(t.visible(idx, "train")).numpy()
    assert np.array_equal(t.apply(x, idx).numpy(), reference(x.numpy(), t.pattern.numpy(), m, 0.15))
    assert np.array_equal(t.apply(x, idx, train=False).numpy(),
                          reference(x.numpy(), t.pattern.numpy(), np.ones((1, 1, *shape[1:])), 0.2))
    mt = t.masks(t.visible(torch.arange(6), "test")).numpy()             # cover test images: keys test:<j>
    assert np.array_equal(t.cross(x, torch.arange(6), torch.arange(6), generator(0, "trigger_cross_test"),
                                  train=False).numpy(),
                          reference(x.numpy(), t.pattern.numpy(), mt, 0.15))
    other = blend_trigger(shape, test_alpha=0.3)                         # test_alpha: test images only
    assert torch.equal(other.apply(x, idx), t.apply(x, idx)) and not torch.equal(other.apply(x, idx, train=False),
                                                                                 t.apply(x, idx, train=False))


# --- records ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blend_record(tmp_path_factory, fake_root):
    path = tmp_path_factory.mktemp("ab") / "adaptive_blend"
    make_record(path, fake_root, "adaptive_blend", extra=["--pratio", "0.05", "--cover_rate", "0.05"])
    return path


def check_record(path, n_p, n_c):
    rec = load_attack_record(path)        # rebuilds every set and checks the digests
    poison = json.loads((path / "poison.json").read_text())
    d = rec.data
    p, c = torch.tensor(poison["poison_indices"]), torch.tensor(poison["cross_indices"])
    assert (len(p), len(c)) == (n_p, n_c) and poison["trigger"]["cover_indices"] == c.tolist()
    assert (d.y_train[p] == 0).all() and (d.poison_indicator[p] == 1).all()
    assert torch.equal(d.y_train[c], d.y_train_true[c]) and (d.poison_indicator[c] == 0).all()
    assert (d.x_train[c] != d.x_train_clean[c]).any() and torch.equal(d.cross_indices, c)
    rest = torch.ones(600, dtype=torch.bool)
    rest[p], rest[c] = False, False
    assert torch.equal(d.x_train[rest], d.x_train_clean[rest]) and torch.equal(d.y_train[rest], d.y_train_true[rest])
    idx, source = defender_clean_subset(d, 0.5, False, 0)
    assert source == "unpoisoned" and not torch.isin(idx, torch.cat([p, c])).any()
    assert (d.y_bd_test_true != 0).all() and len(d.y_bd_test) == 180
    header = (path / "metrics.csv").read_text().splitlines()[0]
    assert "test_cross_acc" in header and "test_cross_asr" in header
    again = build_poisoned_data(rec.dataset, type(rec_trigger(path)).from_record(poison["trigger"], rec_tensors(path)),
                                rec_plan(rec))
    assert again.digests() == poison["digests"]
    return rec, poison


def rec_tensors(path):
    from safetensors.torch import load
    return load((path / "trigger.safetensors").read_bytes())


def rec_trigger(path):
    from utils.triggers import trigger_from_record
    poison = json.loads((path / "poison.json").read_text())
    return trigger_from_record(poison["trigger"], (path / "trigger.safetensors").read_bytes(), path)


def rec_plan(rec):
    from utils.poison import PoisonPlan
    p = rec.poison
    return PoisonPlan("all2one", 0, 1, torch.tensor(p["reserve_indices"], dtype=torch.int64),
                      torch.tensor(p["poison_indices"]), cross_indices=torch.tensor(p["cross_indices"]))


def test_blend_record_rebuilds_and_keeps_covers_out_of_the_clean_pool(blend_record):
    rec, poison = check_record(blend_record, 30, 30)
    t, d = rec_trigger(blend_record), rec.data
    spec = poison["trigger"]
    assert spec["kind"] == "adaptive_blend" and spec["m"] == 8 and spec["piece_size"] == [7, 7]
    assert spec["quantisation"] == "float32_unit_round_half_up" and spec["n_payload"] == 30
    planted = torch.cat([torch.tensor(poison["poison_indices"]), torch.tensor(poison["cross_indices"])]).sort().values
    tensors = rec_tensors(blend_record)
    assert torch.equal(tensors["visible_train_index"], planted) and len(tensors["visible_test"]) == 200
    assert torch.equal(d.x_cross_test, t.partial(d.x_test, torch.arange(200), "test"))   # keys test:<j>, alpha
    assert torch.equal(d.x_bd_test, t.apply(d.x_test[d.bd_test_indices], train=False))
    c = torch.tensor(poison["cross_indices"])                            # cover: training keys, opacity alpha
    assert torch.equal(d.x_train[c], t.partial(d.x_train_clean[c], c, "train"))
    bad = dict(tensors, visible_train=tensors["visible_train"] ^ 1)
    with pytest.raises(UserError, match="piece masks"):
        ab.AdaptiveBlendTrigger.from_record(spec, bad)


# --- Adaptive-Patch ---------------------------------------------------------------------------------------------

def support(name, shape=(3, 32, 32), seed=0):
    mark, mask = ap.generated_patch(name, shape, seed)
    return mark, mask, set(map(tuple, torch.nonzero(mask).tolist()))


@pytest.mark.parametrize("n", [32, 28])
def test_generated_patches_geometry(n):
    h = w = n
    mark, mask, sup = support("four_corner_checkers", (3, n, n))
    white = {(0, 0), (0, 2), (1, 1), (2, 0), (0, 29), (0, 31), (1, 30), (2, 31), (29, 0), (31, 0), (30, 1),
             (31, 2), (29, 31), (30, 30), (31, 29), (31, 31)}
    white = {(r - 32 + n if r > 15 else r, c - 32 + n if c > 15 else c) for r, c in white}
    assert set(map(tuple, torch.nonzero(mark[0] == 255).tolist())) == white and len(sup) == 36
    assert torch.equal(mark[0], mark[2]) and int(mark[:, mask == 0].max()) == 0
    _, _, s = support("corner_logo", (3, n, n))
    assert s == {(r, c) for r in range(h - 5, h) for c in range(w - 5, w)}
    pm, _, s2 = support("corner_logo_pair", (3, n, n))
    lm, _, _ = support("corner_logo", (3, n, n))
    assert len(s2) == 50 and torch.equal(pm[:, h - 5:, :5], lm[:, h - 5:, w - 5:])   # the same logo, unmirrored
    assert torch.equal(pm[:, :, 5:], lm[:, :, 5:])
    _, _, s = support("disc_logo", (3, n, n))
    assert len(s) == 137 and all(1 <= r <= 13 and w - 14 <= c <= w - 2 for r, c in s)
    _, _, s = support("square", (1, n, n))
    assert s == {(r, c) for r in range(h - 11, h - 3) for c in range(w - 11, w - 3)}
    a, b = ap.generated_patch("square", (1, n, n), 0)[0], ap.generated_patch("square", (1, n, n), 1)[0]
    assert torch.equal(a, ap.generated_patch("square", (1, n, n), 0)[0]) and not torch.equal(a, b)
    with pytest.raises(UserError, match="14x14"):
        ap.generated_patch("square", (1, 12, 12), 0)


def test_rank_block_assignment():
    per = lambda n, k=4: torch.bincount(ap.rank_blocks(n, k), minlength=k).tolist()   # noqa: E731
    assert per(150) == [38, 37, 38, 37] and per(300) == [75] * 4 and per(196) == [49] * 4
    assert (per(1), per(2), per(3)) == ([1, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0])
    for k in range(1, 9):               # the authors' float rule: the first j with r < (j + 1) * (n / k)
        for n in range(1, 2001):
            thr = np.arange(1, k + 1) * (n / k)
            floats = np.argmax(np.arange(n)[:, None] < thr[None, :], axis=1)
            assert np.array_equal(floats, ap.rank_blocks(n, k).numpy()), (n, k)


def patch_trigger(shape=(1, 28, 28), train=None, test=None):
    c = {"dataset": {1: "fashion_mnist", 3: "cifar10"}[shape[0]], "patch_seed": 0, "random_seed": 0,
         "train_trigger_names": list(ap.GENERATED[i] for i in (0, 2, 3, 4)), "train_trigger_alphas": [0.5, 0.2, 0.5, 0.3],
         "test_trigger_names": ["corner_logo_pair", "four_corner_checkers"], "test_trigger_alphas": [1.0, 1.0]}
    c.update(train or {})
    c.update(test or {})
    return ap.make_trigger(c)


def test_patch_insertion_hand_values_and_supports():
    t, _ = patch_trigger((3, 32, 32), {"train_trigger_names": ["four_corner_checkers", "four_corner_checkers", "square"],
                                       "train_trigger_alphas": [0.5, 0.2, 0.3]})
    t.assign(torch.tensor([0, 1, 2]), torch.empty(0, dtype=torch.int64))
    x = torch.full((3, 3, 32, 32), 100, dtype=torch.uint8)
    out = t.apply(x, torch.tensor([0, 1, 2]))
    assert (int(out[0, 0, 0, 0]), int(out[0, 0, 0, 1]), int(out[0, 0, 5, 5])) == (178, 50, 100)
    assert int(out[1, 0, 0, 0]) == 131
    sq = t.train_marks[2]
    r, c = torch.nonzero(t.train_masks[2])[0].tolist()
    expect = reference(np.array(100), sq[:, r, c].numpy(), np.array(1.0), 0.3)
    assert np.array_equal(out[2, :, r, c].numpy(), expect)
    full = torch.full((1, 3, 32, 32), 0, dtype=torch.uint8)
    t.train_marks[2] = 255
    assert int(t.apply(full + 100, torch.tensor([2]))[0, 0, r, c]) == 147
    for j, i in enumerate((0, 1, 2)):   # each image differs from its clean image only inside its own patch
        changed = (out[j] != x[j]).any(0)
        assert not changed[t.train_masks[t.planted(torch.tensor([i]))[0]] == 0].any()
    u = torch.arange(256).repeat(4)[:1024].view(1, 1, 32, 32).expand(4, 3, 32, 32).to(torch.uint8).contiguous()
    pt, _ = patch_trigger((3, 32, 32))
    pt.assign(torch.arange(4), torch.empty(0, dtype=torch.int64))
    o = pt.apply(u, torch.arange(4))
    for j in range(4):
        outside = (pt.train_masks[j] == 0).expand(3, 32, 32)
        assert torch.equal(o[j][outside], u[j][outside])


def test_patch_test_trigger_and_its_order():
    t, _ = patch_trigger((3, 32, 32))
    x = torch.randint(0, 256, (5, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    out = t.apply(x, train=False)
    logo = ap.generated_patch("corner_logo", (3, 32, 32), 0)[0][:, 27, 27]
    assert (out[:, :, 31, 31] == 255).all() and (out[:, :, 31, 0] == 255).all()
    assert (out[:, :, 29, 29] == 0).all() and (out[:, :, 29, 2] == 0).all()
    assert (out[:, :, 27, 27] == logo).all() and (out[:, :, 27, 0] == logo).all()
    rev, _ = patch_trigger((3, 32, 32), test={"test_trigger_names": ["four_corner_checkers", "corner_logo_pair"]})
    assert not torch.equal(rev.apply(x, train=False), out)
    g, _ = patch_trigger((3, 32, 32), test={"test_trigger_names": ["disc_logo", "square"]})
    o = g.apply(x, train=False)
    sup = (g.test_masks.sum(0) > 0)
    assert int(sup.sum()) == 137 + 64 and torch.equal(o[:, :, ~sup], x[:, :, ~sup])
    marks = torch.where(g.test_masks[0] > 0, g.test_marks[0], g.test_marks[1])
    assert torch.equal(o[:, :, sup], marks[:, sup].expand(5, -1, -1))


def test_patch_user_files_and_refusals(tmp_path, fake_root):
    from PIL import Image
    mark = np.zeros((28, 28), np.uint8)
    mark[0:4, 0:4] = 200
    Image.fromarray(mark).save(tmp_path / "m.png")
    m, s, origin = ap.make_patch(str(tmp_path / "m.png"), (1, 28, 28), 0, "train_trigger_names")
    assert int(s.sum()) == 16 and origin["mask"] == "non_black" and len(origin["file_sha256"]) == 64
    mk = np.zeros((28, 28), np.uint8)
    mk[0:6, 0:6] = 255
    Image.fromarray(mk).save(tmp_path / "mask_m.png")
    _, s, origin = ap.make_patch(str(tmp_path / "m.png"), (1, 28, 28), 0, "train_trigger_names")
    assert int(s.sum()) == 36 and len(origin["mask"]["file_sha256"]) == 64
    base = ["--dataset_path", str(fake_root)]
    for argv, msg in ((["--train_trigger_alphas", "0.5,0.2"], "4 patches but train_trigger_alphas 2"),
                      (["--test_trigger_names", "nothing_here.png,square"], "train_trigger_names|test_trigger_names"),
                      (["--test_trigger_alphas", "1,1.5"], "test_trigger_alphas"),
                      (["--attack_label_trans", "all2all"], "all2one")):
        with pytest.raises(UserError, match=msg):
            ap.configure(base + argv)


def test_patch_record_rebuilds_and_its_assignment(tmp_path, fake_root):
    path = tmp_path / "adaptive_patch"
    make_record(path, fake_root, "adaptive_patch", extra=["--pratio", "0.05", "--cover_rate", "0.1"])
    rec, poison = check_record(path, 30, 60)
    spec, tensors = poison["trigger"], rec_tensors(path)
    assert spec["payload_per_patch"] == [8, 7, 8, 7] and spec["cover_per_patch"] == [15] * 4
    assert [o["name"] for o in spec["train"]] == ["corner_logo", "disc_logo", "four_corner_checkers", "square"]
    t, d = rec_trigger(path), rec.data
    p = torch.tensor(poison["poison_indices"])
    assert torch.equal(t.planted(p), ap.rank_blocks(30, 4))
    ranks = torch.arange(200) * 4 // 200                              # cover test set: patch by test rank
    assert torch.equal(d.x_cross_test, t.one_patch(d.x_test, ranks))
    assert (path / "trigger_pattern.png").exists()
    last = (path / "metrics.csv").read_text().splitlines()[0]
    assert "test_asr_full_patch_3" in last and "test_asr_train_patch_0" in last
    bad = dict(tensors, planted_patch=tensors["planted_patch"].flip(0))
    with pytest.raises(UserError, match="rank-block"):
        ap.AdaptivePatchTrigger.from_record(spec, bad)
    assert trigger_file_bytes(t) == (path / "trigger.safetensors").read_bytes()


@pytest.mark.parametrize("attack", ["adaptive_blend", "adaptive_patch"])
def test_resume_equals_an_uninterrupted_run(tmp_path, fake_root, attack):
    extra = ["--epochs", "2", "--pratio", "0.05", "--cover_rate", "0.05", "--amp", "false", "--channels_last", "false"]
    whole = make_record(tmp_path / "whole", fake_root, attack, extra=extra)
    with killed_after_checkpoint(lambda phase, epoch: epoch == 1):
        make_record(tmp_path / "cut", fake_root, attack, extra=extra)
    resumed = make_record(tmp_path / "cut", fake_root, attack, extra=extra + ["--resume"])
    for k in ("test_acc", "test_asr", "test_ra", "test_cross_acc"):
        assert whole[k] == resumed[k]
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
