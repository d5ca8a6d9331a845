"""Records: round trip, digests, resume = uninterrupted, same seed = same result, overwrite and incomplete rules."""
import json

import pandas as pd
import pytest
import torch
import yaml

import attack.blend as blend
from tests.conftest import make_record
from utils.errors import UserError
from utils.model_file import load_model_file
from utils.record import load_attack_record
from utils.run_folder import Run
from utils.triggers import PatchTrigger, blend_noise_pattern, trigger_file_bytes

RECORD_FILES = {"config.yaml", "poison.json", "model.pt", "metrics.csv", "summary.json", "trigger.png", "curves.png",
                "log.txt", "trigger_pattern.png", "trigger.safetensors", "record.json"}


def test_record_files_and_round_trip(tiny_record, fake_root):
    p = tiny_record
    assert RECORD_FILES <= {f.name for f in p.iterdir()} and not (p / "checkpoint.pt").exists()
    s = json.loads((p / "summary.json").read_text())
    assert {"test_acc", "test_asr", "test_ra", "seconds", "format_version"} <= set(s)
    assert all(0 <= s[k] <= 1 for k in ("test_acc", "test_asr", "test_ra"))
    m = pd.read_csv(p / "metrics.csv")
    assert {"epoch", "train_loss", "train_acc", "test_acc", "test_asr", "test_ra", "lr", "seconds",
            "train_acc_clean_only", "train_asr_bd_only", "train_ra_bd_only", "clean_test_loss", "bd_test_loss"} <= set(m.columns)
    cfg = yaml.safe_load((p / "config.yaml").read_text())
    assert cfg["config"]["random_seed"] == 0 and cfg["end_time"] and "torch" in cfg["versions"]
    # weights only: loadable with weights_only=True
    d = torch.load(p / "model.pt", weights_only=True)
    assert d["model_name"] == "cnn" and d["format_version"] == 2
    rec = load_attack_record(p, fake_root)
    poison = json.loads((p / "poison.json").read_text())
    assert rec.data.poison_indicator.sum() == poison["n_poison"] == 60
    assert rec.data.poison_indicator.nonzero().flatten().tolist() == poison["poison_indices"]
    assert (rec.data.x_train[rec.data.poison_indicator == 1][:, :, -3:, -3:] == 255).all()
    # the loaded model reproduces the recorded test accuracy
    from utils.engine.device import Precision
    from utils.engine.evaluate import EvalSets, evaluate_backdoor
    r = evaluate_backdoor(rec.model, EvalSets(rec.data, "cpu"), Precision(torch.device("cpu"), True, True))
    assert r["test_acc"] == pytest.approx(s["test_acc"], abs=1e-6) and r["test_asr"] == pytest.approx(s["test_asr"], abs=1e-6)


def test_record_has_no_per_image_files_and_is_small(tiny_record):
    # the attack's own files (other tests write defense records under defense/)
    files = [f for f in tiny_record.rglob("*") if f.is_file() and "defense" not in f.relative_to(tiny_record).parts]
    assert len(files) <= 12
    weights = (tiny_record / "model.pt").stat().st_size
    assert sum(f.stat().st_size for f in files) <= weights + 1_000_000


def test_changed_pattern_or_labels_are_detected(tiny_record, fake_root, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_record, copy)
    (copy / "trigger.safetensors").write_bytes(trigger_file_bytes(PatchTrigger(blend_noise_pattern((1, 28, 28), 3))))
    with pytest.raises(UserError, match="does not match the digest"):
        load_attack_record(copy, fake_root)
    shutil.copy(tiny_record / "trigger.safetensors", copy / "trigger.safetensors")
    poison = json.loads((copy / "poison.json").read_text())
    poison["digests"]["train_labels_sha256"] = "0" * 64
    (copy / "poison.json").write_text(json.dumps(poison))
    with pytest.raises(UserError, match="training labels .* are not the ones"):
        load_attack_record(copy, fake_root)


def test_incomplete_missing_or_foreign_records_are_refused(tiny_record, tmp_path):
    import shutil
    with pytest.raises(UserError, match="no attack record"):
        load_attack_record(tmp_path / "nothing")
    copy = tmp_path / "partial"
    shutil.copytree(tiny_record, copy)
    (copy / "summary.json").unlink()
    with pytest.raises(UserError, match="incomplete.*--resume"):
        load_attack_record(copy)
    shutil.copy(tiny_record / "summary.json", copy / "summary.json")
    s = json.loads((copy / "summary.json").read_text())
    s["format_version"] = 99
    (copy / "summary.json").write_text(json.dumps(s))
    with pytest.raises(UserError, match="format version 99"):
        load_attack_record(copy)


def test_model_file_that_is_not_weights_only_is_refused(tmp_path):
    import subprocess
    torch.save({"x": subprocess.Popen}, tmp_path / "model.pt")  # a pickle that names arbitrary code
    with pytest.raises(UserError, match="not a weights-only"):
        load_model_file(tmp_path / "model.pt")
    torch.save({"format_version": 1, "defense": "pdb", "inner_state_dict": {}}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="defended model"):
        load_model_file(tmp_path / "model.pt")


def test_existing_record_is_not_overwritten_without_the_flag(tiny_record, fake_root):
    before = (tiny_record / "model.pt").read_bytes()
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        make_record(tiny_record, fake_root)
    assert (tiny_record / "model.pt").read_bytes() == before


@pytest.mark.device
def test_same_seed_same_result_and_resume_equals_uninterrupted(tmp_path, fake_root, monkeypatch, run_device):
    extra = ["--epochs", "3", "--cos_t_max", "3", "--device", run_device]
    a = tmp_path / "a"
    b = tmp_path / "b"
    make_record(a, fake_root, extra=extra)
    make_record(b, fake_root, extra=extra)
    wa = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    drop = ["seconds"]
    ma, mb = pd.read_csv(a / "metrics.csv").drop(columns=drop), pd.read_csv(b / "metrics.csv").drop(columns=drop)
    pd.testing.assert_frame_equal(ma, mb)

    # interrupt after the checkpoint of epoch 2 is written
    c = tmp_path / "c"
    original = Run.save_checkpoint

    def save_then_die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        if epoch == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_record(c, fake_root, extra=extra)
    monkeypatch.setattr(Run, "save_checkpoint", original)
    assert (c / "checkpoint.pt").exists() and not (c / "summary.json").exists()
    with pytest.raises(UserError, match="incomplete record.*--resume"):
        make_record(c, fake_root, extra=extra)
    with pytest.raises(UserError, match="differ from the interrupted run.*lr"):
        make_record(c, fake_root, extra=extra + ["--resume", "--lr", "0.5"])
    make_record(c, fake_root, extra=extra + ["--resume"])
    wc = torch.load(c / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    pd.testing.assert_frame_equal(ma, pd.read_csv(c / "metrics.csv").drop(columns=drop))
    assert "resuming from the checkpoint of epoch 2" in (c / "log.txt").read_text()


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing_or_restarts(tmp_path, fake_root, monkeypatch):
    extra = ["--epochs", "2", "--cos_t_max", "2"]
    # stopped inside the first epoch: the new folder is removed, the same command simply runs again
    d = tmp_path / "d"
    original = Run.save_checkpoint

    def die(self, epoch, state, phase=0):
        raise KeyboardInterrupt
    monkeypatch.setattr(Run, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        make_record(d, fake_root, extra=extra)
    assert not d.exists()
    # killed outright (no clean-up): a folder of ours without a checkpoint; --resume starts it again
    monkeypatch.setattr(Run, "save_checkpoint", original)
    d.mkdir()
    (d / "record.json").write_text('{"toolkit": "backdoor-toolkit"}')   # the marker, written first by every run
    (d / "config.yaml").write_text("method: badnet\n")
    (d / "poison.json").write_text("{}")
    with pytest.raises(UserError, match="before its first checkpoint.*--resume or --overwrite"):
        make_record(d, fake_root, extra=extra)
    s = make_record(d, fake_root, extra=extra + ["--resume"])
    assert (d / "summary.json").exists() and 0 <= s["test_acc"] <= 1
    # a resumed run's wall time counts the sessions before the interruption
    e = tmp_path / "e"

    def save_then_die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        if epoch == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_record(e, fake_root, extra=extra)
    first = torch.load(e / "checkpoint.pt", weights_only=True)["elapsed"]
    monkeypatch.setattr(Run, "save_checkpoint", original)
    s = make_record(e, fake_root, extra=extra + ["--resume"])
    assert s["seconds"] > first > 0


def test_a_folder_that_is_not_a_record_is_not_replaced(tmp_path, fake_root):
    f = tmp_path / "mine"
    f.mkdir()
    (f / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"], ["--resume"]):
        with pytest.raises(UserError, match="not a record of this toolkit.*nothing was changed"):
            make_record(f, fake_root, extra=extra)
        assert sorted(p.name for p in f.iterdir()) == ["notes.txt"] and (f / "notes.txt").read_text() == "keep me"


def test_blend_all2all_with_reserve_round_trip(tmp_path, fake_root):
    p = tmp_path / "blend_all2all"
    s = blend.main(["--dataset_path", str(fake_root), "--save_folder_name", str(p), "--epochs", "1",
                    "--attack_label_trans", "all2all", "--reserve_ratio", "0.1", "--reserve_rule", "first"])
    rec = load_attack_record(p, fake_root)
    assert len(rec.data.reserve_indices) == 60 and len(rec.data.train_indices) == 540
    assert rec.data.poison_indicator.sum() == 54
    assert torch.equal(rec.data.y_bd_test, (rec.data.y_bd_test_true + 1) % 10) and len(rec.data.y_bd_test) == 200
    assert rec.poison["trigger"]["kind"] == "blend" and rec.poison["trigger"]["source"] == "noise"
    assert 0 <= s["test_asr"] <= 1
