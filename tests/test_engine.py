"""The training engine: no host sync changes a figure, the precision probe and what it records, determinism,
compile's fall-back, checkpoint spacing, CPU copies in files, and the CUDA-path fixes the CPU can show.
Device-selectable cases (resume equals an uninterrupted run, same seed same result) carry the `device` marker:
`pytest -m device --device cuda` runs them on a GPU."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import make_record
from models import build_model
from utils.engine import device as device_mod
from utils.engine import probe
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.device import Precision, pick_device
from utils.engine.epoch import train_epoch_supervised
from utils.engine.loop import Phase, fit
from utils.io import atomic_torch_save, on_cpu
from utils.metrics import accuracy
from utils.run_folder import Run
from utils.seeding import set_determinism


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", 10, 1, (0.5,), (0.5,), 4)


def per_step_reference(model, x, y, opt, precision, gen, batch, augment):
    """The epoch as it was written before: a host read-back of the loss and the predictions after every step."""
    model.train()
    order = torch.randperm(len(y), generator=gen)
    total, seen, preds, orders = 0.0, 0, [], []
    for i in range(0, (len(y) // batch) * batch, batch):
        idx = order[i:i + batch]
        xb = precision.prepare_input(augment(to_unit(x[idx])))
        with precision.autocast():
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), y[idx])
        opt.zero_grad(set_to_none=True)
        precision.step(loss, opt)
        total += loss.item() * len(idx)
        seen += len(idx)
        preds.append(logits.argmax(1).cpu())
        orders.append(idx)
    preds, order = torch.cat(preds), torch.cat(orders)
    return {"train_loss": total / seen, "train_acc": accuracy(preds, y[order])}, preds


@pytest.mark.parametrize("amp", [False, True])
def test_the_sync_free_epoch_gives_the_per_step_loops_figures_to_the_last_digit(amp):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (200, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (200,), generator=g)
    out = []
    for fn in ("reference", "engine"):
        model = tiny_model()
        precision = Precision(torch.device("cpu"), amp, True)
        model = precision.prepare_model(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        shuffle, aug = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        augment = lambda b: random_crop_flip(b, aug, 2, True)   # noqa: E731
        if fn == "reference":
            stats, preds = per_step_reference(model, x, y, opt, precision, shuffle, 32, augment)
        else:
            stats, _, preds = train_epoch_supervised(model, x, y, opt, precision, shuffle, 32, True, augment)
        out.append((stats, preds, [p.detach().clone() for p in model.parameters()]))
    (s1, p1, w1), (s2, p2, w2) = out
    assert s1 == s2                       # exact equality of the floats, not approximate
    assert torch.equal(p1, p2)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


def fake_speeds(table):
    def measure(model, device, candidates, input_shape, batch_size):
        return [table[probe.label(a, c)] for a, c in candidates]
    return measure


AUTO = {"amp": "auto", "channels_last": "auto"}


def interrupted_after_first_checkpoint(monkeypatch, path, root, extra):
    """An attack run killed right after its first checkpoint is written."""
    original = Run.save_checkpoint

    def save_then_die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        raise KeyboardInterrupt
    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_record(path, root, extra=extra)
    monkeypatch.setattr(Run, "save_checkpoint", original)


def test_the_probe_takes_the_fastest_candidate_only_beyond_the_margin_and_caches_it(monkeypatch):
    monkeypatch.setattr(probe, "cpu_bf16", lambda: True)
    monkeypatch.setattr(device_mod, "cpu_bf16", lambda: True)
    calls = []
    table = {"fp32": 100.0, "fp32 + channels_last": 104.0, "bf16": 90.0, "bf16 + channels_last": 150.0}

    def counting(*a):
        calls.append(1)
        return fake_speeds(table)(*a)
    monkeypatch.setattr(probe, "measure", counting)
    cpu = torch.device("cpu")
    a, c, how = probe.resolve_precision(AUTO, cpu, tiny_model(), "cnn width 4", (1, 28, 28), 128)
    assert (a, c) == (True, True) and how["img_per_s"] == table and how["source"].startswith("probe")
    a, c, how = probe.resolve_precision(AUTO, cpu, tiny_model(), "cnn width 4", (1, 28, 28), 128)
    assert (a, c) == (True, True) and how["source"] == "cached probe" and len(calls) == 1
    # within 5% of plain fp32: fp32 (timing noise must not switch the precision)
    table.update({"bf16 + channels_last": 104.9})
    a, c, _ = probe.resolve_precision(AUTO, cpu, tiny_model(), "cnn width 4", (1, 28, 28), 64)
    assert (a, c) == (False, False) and len(calls) == 2
    # forced values are not probed; a forced amp probes only the layout
    assert probe.resolve_precision({"amp": False, "channels_last": True}, cpu, None, "x", (1,), 1)[:2] == (False, True)
    table.update({"fp32 + channels_last": 130.0})
    a, c, _ = probe.resolve_precision({"amp": False, "channels_last": "auto"}, cpu, tiny_model(), "m2", (1, 28, 28), 8)
    assert (a, c) == (False, True)


def test_a_damaged_cache_is_probed_again(monkeypatch):
    monkeypatch.setattr(probe, "cpu_bf16", lambda: True)
    monkeypatch.setattr(probe, "measure", fake_speeds({"fp32": 1.0, "fp32 + channels_last": 1.0, "bf16": 9.0,
                                                       "bf16 + channels_last": 1.0}))
    probe.cache_file().parent.mkdir(parents=True, exist_ok=True)
    probe.cache_file().write_text("{not json")
    a, c, how = probe.resolve_precision(AUTO, torch.device("cpu"), tiny_model(), "damaged", (1, 28, 28), 16)
    assert (a, c) == (True, False) and how["source"].startswith("probe")
    assert any("damaged" in k for k in json.loads(probe.cache_file().read_text()))


def test_a_real_probe_runs_in_a_moment_and_leaves_the_model_and_random_streams_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a, c, how = probe.resolve_precision(AUTO, torch.device("cpu"), model, "real probe", (1, 28, 28), 32)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(how["img_per_s"]) >= {"fp32", "fp32 + channels_last"} and all(v > 0 for v in how["img_per_s"].values())


@pytest.mark.device
def test_auto_precision_is_recorded_and_a_resume_keeps_it_whatever_the_cache_says(tmp_path, fake_root, monkeypatch,
                                                                                   run_device):
    monkeypatch.setattr(probe, "cpu_bf16", lambda: True)
    monkeypatch.setattr(device_mod, "cpu_bf16", lambda: True)
    monkeypatch.setattr(probe, "measure", fake_speeds({"fp32": 1.0, "fp32 + channels_last": 1.0, "bf16": 1.0,
                                                       "bf16 + channels_last": 2.0}))
    extra = ["--epochs", "2", "--cos_t_max", "2", "--amp", "auto", "--channels_last", "auto", "--device", run_device]
    make_record(tmp_path / "full", fake_root, extra=extra)
    meta = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())
    choice = meta["precision_choice"]
    if run_device == "cpu":
        assert (choice["amp"], choice["channels_last"]) == (True, True) and meta["precision"].startswith("torch.bfloat16")
    assert meta["config"]["amp"] == "auto" and meta["tf32"] is False and len(meta["sessions"]) == 1

    interrupted_after_first_checkpoint(monkeypatch, tmp_path / "cut", fake_root, extra)
    # the machine's cache now says plain fp32: the resumed record keeps what it started with
    monkeypatch.setattr(probe, "measure", fake_speeds({"fp32": 9.0, "fp32 + channels_last": 1.0, "bf16": 1.0,
                                                       "bf16 + channels_last": 1.0}))
    probe.cache_file().unlink()
    make_record(tmp_path / "cut", fake_root, extra=extra + ["--resume"])
    cut = yaml.safe_load((tmp_path / "cut" / "config.yaml").read_text())
    assert cut["precision"] == meta["precision"] and cut["precision_choice"]["source"].startswith("recorded")
    assert len(cut["sessions"]) == 2
    wa = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resume_on_another_precision_is_recorded_and_said(tmp_path, fake_root, monkeypatch, capsys):
    extra = ["--epochs", "2", "--cos_t_max", "2", "--amp", "false", "--channels_last", "false"]
    interrupted_after_first_checkpoint(monkeypatch, tmp_path / "r", fake_root, extra)
    path = tmp_path / "r" / "config.yaml"
    meta = yaml.safe_load(path.read_text())
    meta["sessions"][0]["precision"] = "torch.float16"   # as if the first session had run on a GPU in fp16
    path.write_text(yaml.safe_dump(meta))
    capsys.readouterr()
    make_record(tmp_path / "r", fake_root, extra=extra + ["--resume"])
    assert "differs from an uninterrupted run" in capsys.readouterr().out
    sessions = yaml.safe_load(path.read_text())["sessions"]
    assert [s["precision"] for s in sessions] == ["torch.float16", "fp32"]


def test_checkpoint_every_n_epochs_and_after_the_last(tmp_path):
    run = Run(tmp_path / "r", "t", {"checkpoint_every": 2})
    saved = []
    run.save_checkpoint = lambda epoch, state, phase=0: saved.append(epoch)
    phase = Phase("p", 5, lambda e: {"lr": 0.1, "train_loss": 1.0}, lambda: {})
    fit(run, phase, {})
    assert saved == [2, 4, 5] and len(run.rows) == 5
    run.close()


def test_determinism_switches(monkeypatch):
    set_determinism(False, "cpu")
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    set_determinism(True, "cpu")
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled()   # CPU kernels are deterministic already
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, **kw: calls.append((on, kw)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_determinism(True, "cuda")
    import os
    assert calls == [(True, {"warn_only": True})] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_plain_fp32_turns_tf32_off_and_emulated_bf16_gives_fp16(monkeypatch):
    torch.backends.cudnn.allow_tf32 = True
    Precision(torch.device("cpu"), False, False)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    asked = []

    def bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation   # a T4: bf16 only through emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    assert device_mod.cuda_low_precision() == torch.float16 and asked == [False]


def test_pick_device_makes_the_chosen_card_current(monkeypatch):
    made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: made.append(i))
    assert pick_device("cuda:1") == torch.device("cuda", 1) and made == [1]


def test_compile_falls_back_to_eager_with_one_message(monkeypatch, capsys):
    monkeypatch.setattr(device_mod, "compile_unavailable", lambda device: "no toolchain (test)")
    p = Precision(torch.device("cpu"), False, False, compile=True)
    assert p.compile is None and "unavailable here (no toolchain (test)); running eager" in capsys.readouterr().out
    assert device_mod.compile_mode(torch.device("cuda"), True) == "reduce-overhead"
    assert device_mod.compile_mode(torch.device("cpu"), "max-autotune") == "max-autotune"


def test_files_hold_cpu_tensors_and_keep_state_dict_versions(tmp_path):
    sd = tiny_model().state_dict()
    out = on_cpu({"state_dict": sd, "rows": [1, (torch.ones(2), "a")]})
    assert out["state_dict"]._metadata == sd._metadata and isinstance(out["rows"][1], tuple)
    atomic_torch_save({"state_dict": sd}, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=True, map_location="cpu")["state_dict"]
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_bypass_noise_stream_is_a_cpu_generator_whatever_the_device():
    from attack import bypass
    cfg = {"random_seed": 0, "disc_hidden": [8], "disc_leaky_slope": 0.2, "disc_input_noise": 1.0, "disc_lr": 0.1,
           "disc_momentum": 0.9, "disc_weight_decay": 0.0}
    model = tiny_model()
    _, _, gen = bypass.build_discriminator(model, cfg, torch.device("meta"))
    assert gen.device.type == "cpu"   # its state has the CPU size, so a checkpoint resumes on either device type


def test_bench_gpu_smoke_runs_every_section():
    import bench.gpu as gpu
    times = gpu.main(["--smoke"])
    assert times["real"] > 0 and times["bare"] > 0
