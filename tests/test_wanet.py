"""WaNet (docs/specs/wanet.md §9): the identity grid, a warp computed by hand on both axes, the field and its seed,
the clamp, the per-batch counts, labels and kinds of a hand-made batch, the noise bound and stream, a record that
rebuilds bit for bit (cross test set included, cross samples out of the defenders' clean pool), resume, and the
options that are refused."""
import json

import pytest
import torch

import attack.wanet as wanet
from tests.conftest import killed_after_checkpoint, make_record
from utils.errors import UserError
from utils.poison import defender_clean_subset
from utils.record import load_attack_record, record_trigger
from utils.seeding import generator

FP32 = ["--amp", "false", "--channels_last", "false"]   # no precision probe: seconds saved per run
CFG = {"dataset": "fashion_mnist", "random_seed": 0, "grid_seed": None, "k": 4, "s": 0.5, "grid_rescale": 1.0,
       "cross_ratio": 2.0}


def trigger_with_field(field, s=0.5, grid_rescale=1.0):
    """A WarpTrigger on a hand-made field N (H, W, 2)."""
    p = torch.zeros(2, 2, 2)
    return wanet.WarpTrigger(p, field, wanet.make_grid(field, s, grid_rescale), 2, s, grid_rescale, 0)


def test_the_identity_grid_and_an_identity_warp_returns_the_image_bit_for_bit():
    i3 = wanet.identity_grid(3)
    assert i3.shape == (3, 3, 2) and i3[0, 2].tolist() == [1.0, -1.0] and i3[2, 0].tolist() == [-1.0, 1.0]
    assert i3[:, :, 0][0].tolist() == [-1.0, 0.0, 1.0] and i3[:, :, 1][:, 0].tolist() == [-1.0, 0.0, 1.0]
    g = torch.Generator().manual_seed(0)
    for h in (3, 4, 28, 32, 64):
        trig = trigger_with_field(torch.rand(h, h, 2, generator=g), s=0.0)
        assert torch.equal(trig.grid, wanet.identity_grid(h))
        x = torch.randint(0, 256, (3, 3, h, h), dtype=torch.uint8, generator=g)
        assert torch.equal(trig.apply(x), x), h   # rounding, not truncation, undoes the float32 linspace error


def test_a_warp_computed_by_hand_on_both_axes():
    ramp = torch.tensor([0, 60, 120, 180], dtype=torch.uint8)
    along = torch.zeros(4, 4, 2)
    along[..., 0] = 1                                   # N = (1, 0): a shift along the columns
    trig = trigger_with_field(along)
    # offset 0.5 / 4 = 0.125 normalised = 0.1875 px: 11.25, 71.25, 131.25, and the clamped last column 180
    out = trig.apply(ramp.expand(1, 1, 4, 4).contiguous())[0, 0]
    assert (out == torch.tensor([11, 71, 131, 180], dtype=torch.uint8)).all()
    x64 = ramp.double().expand(1, 1, 4, 4) / 255
    exact = wanet.warp(x64, trig.grid[None].double())[0, 0, 0] * 255
    assert exact.tolist() == pytest.approx([11.25, 71.25, 131.25, 180], abs=1e-4)
    down = torch.zeros(4, 4, 2)
    down[..., 1] = 1                                    # N = (0, 1): the same numbers down the columns of a row ramp
    out = trigger_with_field(down).apply(ramp[:, None].expand(1, 1, 4, 4).contiguous())[0, 0]
    assert (out == torch.tensor([11, 71, 131, 180], dtype=torch.uint8)[:, None]).all()


def test_the_field_its_seed_and_the_stored_tensors():
    p = wanet.control_points(4, 7)
    assert p.shape == (2, 4, 4) and p.dtype == torch.float32 and p.abs().mean().item() == pytest.approx(1, abs=1e-6)
    n = wanet.upsample_field(p, 28)
    assert n.shape == (28, 28, 2)
    for (i, j), (a, b) in {(0, 0): (0, 0), (0, 27): (0, 3), (27, 0): (3, 0), (27, 27): (3, 3)}.items():
        assert torch.allclose(n[i, j], p[:, a, b], atol=1e-6)
    t1, _ = wanet.make_trigger({**CFG, "grid_seed": 5, "random_seed": 0})
    t2, _ = wanet.make_trigger({**CFG, "grid_seed": 5, "random_seed": 9})   # grid_seed given: random_seed plays no part
    t3, meta = wanet.make_trigger({**CFG, "grid_seed": 6})
    assert torch.equal(t1.grid, t2.grid) and not torch.equal(t1.grid, t3.grid)
    t0, _ = wanet.make_trigger(CFG)
    assert torch.equal(t0.control_points, wanet.control_points(4, 0)) and t0.grid_seed == 0
    assert set(t0.tensors()) == {"control_points", "field", "grid"}
    assert 0 < meta["grid_mean_shift_px"] < meta["grid_max_shift_px"] < 1.5    # s 0.5: about a quarter pixel


def test_the_clamp_keeps_every_sample_inside_the_image():
    t, _ = wanet.make_trigger({**CFG, "s": 50.0})
    assert t.grid.min() >= -1 and t.grid.max() <= 1 and (t.grid.abs() == 1).any()
    flat = torch.full((2, 1, 28, 28), 200, dtype=torch.uint8)
    assert torch.equal(t.apply(flat), flat)           # no zero padding darkens the border
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = t.apply(x)
    at_corner = (t.grid.abs() == 1).all(-1)           # both coordinates clamped: exactly an edge corner pixel
    cols, rows = ((t.grid[at_corner] + 1) / 2 * 27).round().long().unbind(-1)
    assert at_corner.sum() > 10 and torch.equal(out[:, :, at_corner], x[:, :, rows, cols])


def test_the_per_batch_counts():
    counts = wanet.wanet_rule({"pratio": 0.1, "cross_ratio": 2.0, "epochs": 1}).counts
    g = torch.Generator().manual_seed(0)
    assert counts(128, g) == (12, 24) and counts(80, g) == (8, 16)
    assert wanet.wanet_rule({"pratio": 0.29, "cross_ratio": 0.0, "epochs": 1}).counts(100, g) == (28, 0)
    low = wanet.wanet_rule({"pratio": 0.001, "cross_ratio": 2.0, "epochs": 1}).counts
    draws = [low(128, g) for _ in range(10_000)]
    assert set(draws) == {(0, 0), (1, 2)} and abs(sum(d[0] for d in draws) / 10_000 - 0.128) < 0.01
    with pytest.raises(UserError, match=r"pratio 0\.4 with cross_ratio 2\.0 .*1\.2"):
        wanet.configure(["--pratio", "0.4"])


@pytest.mark.parametrize("mode,shift", [("all2one", 1), ("all2all", 1), ("all2all", 3)])
def test_labels_and_kinds_on_a_hand_made_batch(mode, shift):
    t, _ = wanet.make_trigger(CFG)
    y = torch.tensor([0, 5, 3, 9, 1, 2, 4, 6, 7, 8])      # position 0 already carries the target 0
    x = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    n_bd, n_cr = wanet.wanet_rule({"pratio": 0.2, "cross_ratio": 1.0, "epochs": 1}).counts(10, None)
    assert (n_bd, n_cr) == (2, 2)
    relabel = lambda v: torch.zeros_like(v) if mode == "all2one" else (v + shift) % 10  # noqa: E731
    xb, yb = wanet.poison_batch(x, y, n_bd, n_cr, t.grid[None], generator(0, "wanet_noise"), relabel)
    want = [0, 0] if mode == "all2one" else [shift % 10, (5 + shift) % 10]
    assert yb[:2].tolist() == want and torch.equal(yb[2:], y[2:])
    u = x.float() / 255
    warped = wanet.warp(u[:4], t.grid[None].expand(4, -1, -1, -1))
    assert torch.allclose(xb[:2], warped[:2]) and not torch.equal(xb[:2], u[:2])
    for i in (2, 3):    # noise samples: neither clean nor the trigger's warp
        assert (xb[i] - u[i]).abs().max() > 1e-3 and (xb[i] - warped[i]).abs().max() > 1e-3
    assert torch.equal(xb[4:], u[4:])                     # untouched before augmentation


def test_noise_grids_stay_within_one_pixel_unit_and_the_stream_resumes():
    t, _ = wanet.make_trigger(CFG)
    g = torch.Generator().manual_seed(3)
    a = wanet.noisy_grid(t.grid, wanet.jitter(4, 28, g))
    state = g.get_state()
    b = wanet.noisy_grid(t.grid, wanet.jitter(4, 28, g))
    assert (a - t.grid).abs().max() <= 1 / 28 + 1e-7 and not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])                    # one jitter per image
    g.set_state(state)
    assert torch.equal(wanet.noisy_grid(t.grid, wanet.jitter(4, 28, g)), b)


def test_the_record_rebuilds_bit_for_bit_and_keeps_noise_samples_out_of_the_clean_pool(tmp_path, fake_root):
    path = tmp_path / "wanet"
    s = make_record(path, fake_root, "wanet", extra=["--epochs", "2", "--s", "1.0", "--random_crop", "1", *FP32])
    poison = json.loads((path / "poison.json").read_text())
    rec = load_attack_record(path)                        # every digest checked, the cross test set's included
    data = rec.data
    bd, cross = torch.tensor(poison["poison_indices"]), torch.tensor(poison["cross_indices"])
    # 600 samples, batches of 64 with drop_last: 9 batches of 6 warped and 12 noise samples
    assert poison["per_batch"]["full_batch"] == {"n_bd": 6, "n_cross": 12}
    assert len(bd) == 54 and len(cross) == 108 and not set(bd.tolist()) & set(cross.tolist())
    assert poison["trigger"]["kind"] == "warp" and poison["trigger"]["cross_ratio"] == 2.0
    assert "cross_test_sha256" in poison["digests"] and "test_cross_acc" in s
    trig = record_trigger(path, poison)
    assert isinstance(trig, wanet.WarpTrigger) and trig.s == 1.0
    assert torch.equal(data.x_train[bd], trig.apply(data.x_train_clean[bd])) and (data.y_train[bd] == 0).all()
    every = torch.arange(len(data.y_test))
    assert torch.equal(data.x_cross_test, trig.cross(data.x_test, every, every, generator(0, "trigger_cross_test")))
    assert torch.equal(data.y_train[cross], data.y_train_true[cross]) and (data.poison_indicator[cross] == 0).all()
    assert (data.x_train[cross] != data.x_train_clean[cross]).any()
    assert (data.x_train[cross] != trig.apply(data.x_train_clean[cross])).any()
    idx, source = defender_clean_subset(data, 0.5, False, 0)
    assert source == "unpoisoned" and not set(idx.tolist()) & (set(bd.tolist()) | set(cross.tolist()))
    import pandas as pd
    row = pd.read_csv(path / "metrics.csv").iloc[-1]
    assert row["n_bd_epoch"] == 54 and row["n_cross_epoch"] == 108 and 0 <= row["train_cross_acc_only"] <= 1
    config = (path / "config.yaml").read_text()
    assert "grid_mean_shift_px" in config and "drop_last = True" in config and "crop_padding = 1" in config
    # a changed grid entry, or another noise seed, is detected
    blob = (path / "trigger.safetensors").read_bytes()
    (path / "trigger.safetensors").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(UserError, match="does not match the digest"):
        load_attack_record(path)
    (path / "trigger.safetensors").write_bytes(blob)
    (path / "poison.json").write_text(json.dumps({**poison, "trigger_seed": 1}))
    with pytest.raises(UserError, match="gave a different"):
        load_attack_record(path)


def test_resume_equals_an_uninterrupted_run(tmp_path, fake_root):
    extra = ["--epochs", "2", "--batch_size", "100", *FP32]
    whole = make_record(tmp_path / "whole", fake_root, "wanet", extra=extra)
    with killed_after_checkpoint(lambda phase, epoch: epoch == 1):
        make_record(tmp_path / "cut", fake_root, "wanet", extra=extra)
    resumed = make_record(tmp_path / "cut", fake_root, "wanet", extra=[*extra, "--resume"])
    for k in ("test_acc", "test_asr", "test_ra", "test_cross_acc"):
        assert whole[k] == resumed[k]
    import pandas as pd
    a, b = (pd.read_csv(tmp_path / n / "metrics.csv") for n in ("whole", "cut"))
    cols = ["train_loss", "train_asr_bd_only", "train_cross_acc_only", "test_acc", "test_cross_acc"]
    assert a[cols].equals(b[cols])
    wa = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_non_square_images_and_bad_options_are_refused():
    with pytest.raises(UserError, match="square images only"):
        wanet.make_trigger(CFG, shape=(1, 28, 32))
    for argv, msg in ((["--k", "1"], "k = 1"), (["--s", "-0.1"], "s = -0.1"), (["--grid_rescale", "0"], "grid_rescale"),
                      (["--cross_ratio", "-1"], "cross_ratio"), (["--wanet_aug", "kornia"], "wanet_aug")):
        with pytest.raises(UserError, match=msg):
            wanet.configure(argv)
    with pytest.raises(UserError, match="p_num does not apply"):
        wanet.configure(["--p_num", "10"])


def test_the_original_schedule_from_default_yaml():
    from utils.engine.optim import make_scheduler
    cfg = wanet.configure(["--dataset", "cifar10"])[0]
    assert (cfg["lr"], cfg["lr_scheduler"], cfg["steplr_milestones"], cfg["steplr_gamma"], cfg["epochs"]) == \
        (0.01, "MultiStepLR", [100, 200, 300, 400], 0.1, 100)
    assert cfg["crop_padding"] == cfg["random_crop"] == 5 and cfg["drop_last"] is True
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg["lr"])
    sched, lrs = make_scheduler(opt, cfg), []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:100] == [0.01] * 100 and lrs[100:] == pytest.approx([0.001] * 100)
    fm = wanet.configure([])[0]
    assert fm["lr_scheduler"] == "CosineAnnealingLR" and fm["cos_t_max"] == fm["epochs"] and fm["model"] == "cnn"
