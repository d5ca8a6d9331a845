"""Resources (utils/resources.py, utils/clean_model.py): found and reused, built when absent, refused when
incomplete, damaged, stale or made for another dataset; --resource_rebuild moves the old one aside; the clean model
is reproducible from its seed and resumes to the uninterrupted result; two processes build a resource once."""
import json
import threading
import time

import pytest
import torch

from tests.conftest import killed_after_checkpoint, synthetic_images, write_mnist_like
from utils.attack import attack_config
from utils.clean_model import clean_model
from utils.data import load_dataset
from utils.errors import UserError
from utils.resources import obtain, resource_options, save_tensors


def identity(**kw):
    return {"kind": "toy", "dataset": "fashion_mnist", "params": {"a": 1}, **kw}


def toy_build(value=1.0, calls=None):
    def build(folder, resumed):
        if calls is not None:
            calls.append(folder)
        save_tensors(folder, {"v": torch.full((3,), value)})
        return {"figure": value}
    return build


def test_built_then_reused_and_files_listed(tmp_path):
    calls = []
    r = obtain(tmp_path, "toy_a", identity(), toy_build(calls=calls))
    assert r.built and r.meta["complete"] and set(r.meta["files"]) == {"tensors.safetensors"}
    assert r.meta["figure"] == 1.0 and r.meta["build_seconds"] >= 0
    r2 = obtain(tmp_path, "toy_a", identity(), toy_build(calls=calls))
    assert not r2.built and len(calls) == 1
    assert torch.equal(r2.tensors()["v"], torch.ones(3))
    assert r2.describe()["resource_sha256"] == r.digest()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize("change, words", [
    ({"dataset": "mnist"}, "made for another dataset"),
    ({"params": {"a": 2}}, "made with other settings"),
    ({"upstream_clean_model": "0" * 64}, "stale"),
])
def test_refused_when_the_identity_differs(tmp_path, change, words):
    obtain(tmp_path, "toy_a", identity(), toy_build())
    with pytest.raises(UserError, match=words) as e:
        obtain(tmp_path, "toy_a", identity(**change), toy_build())
    assert "--resource_rebuild" in str(e.value) and "toy_a" in str(e.value)
    key = {"params": "params.a"}.get(next(iter(change)), next(iter(change)))
    assert f"{key}: wanted" in str(e.value)


def test_refused_when_incomplete_or_damaged(tmp_path):
    r = obtain(tmp_path, "toy_a", identity(), toy_build())
    (r.path / "tensors.safetensors").write_bytes(b"tampered")
    with pytest.raises(UserError, match="damaged: tensors.safetensors does not match its digest"):
        obtain(tmp_path, "toy_a", identity(), toy_build())
    (r.path / "resource.json").unlink()
    with pytest.raises(UserError, match="incomplete"):
        obtain(tmp_path, "toy_a", identity(), toy_build())
    (r.path / "resource.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        obtain(tmp_path, "toy_a", identity(), toy_build())


def test_rebuild_moves_the_old_folder_aside(tmp_path):
    obtain(tmp_path, "toy_a", identity(), toy_build(1.0))
    kept = obtain(tmp_path, "toy_a", identity(), toy_build(3.0), rebuild=["other_kind"])   # another kind: reused
    assert not kept.built
    r = obtain(tmp_path, "toy_a", identity(params={"a": 2}), toy_build(2.0), rebuild=["toy"])
    assert r.built and torch.equal(r.tensors()["v"], torch.full((3,), 2.0))
    old = [p for p in tmp_path.iterdir() if p.name.startswith("toy_a.old-")]
    assert len(old) == 1 and json.loads((old[0] / "resource.json").read_text())["identity"]["params"] == {"a": 1}


def test_an_interrupted_build_leaves_nothing_in_place_and_is_refused_without_resume(tmp_path):
    def dies(folder, resumed):
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        obtain(tmp_path, "toy_a", identity(), dies)
    assert not (tmp_path / "toy_a").exists() and (tmp_path / ".toy_a.partial" / "half.bin").exists()
    with pytest.raises(UserError, match="interrupted.*--resume.*--resource_rebuild"):
        obtain(tmp_path, "toy_a", identity(), toy_build())
    r = obtain(tmp_path, "toy_a", identity(), toy_build(), resume=True)   # not resumable: started again, cleanly
    assert r.built and "half.bin" not in r.meta["files"]


def test_two_processes_build_once(tmp_path):
    calls, out = [], []

    def slow(folder, resumed):
        calls.append(folder)
        time.sleep(0.3)
        return toy_build()(folder, resumed)
    threads = [threading.Thread(target=lambda: out.append(obtain(tmp_path, "toy_a", identity(), slow)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r.built for r in out) == [False, True]


@pytest.fixture
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    xtr, ytr = synthetic_images(300, 0)
    xte, yte = synthetic_images(100, 1)
    return write_mnist_like(root, "fashion_mnist", xtr, ytr, xte, yte)


def clean_cfg(root, res, *extra):
    cfg, _ = attack_config("toy", resource_options(), ["--dataset_path", str(root), "--model_width", "2", "--amp",
                                                       "false", "--channels_last", "false", "--resource_root", str(res),
                                                       *extra])
    return cfg


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_clean_model_reproducible_reused_refused_and_resumable(small_root, tmp_path):
    ds = load_dataset("fashion_mnist", str(small_root))
    m1, r1 = clean_model(clean_cfg(small_root, tmp_path / "a"), ds)
    m2, r2 = clean_model(clean_cfg(small_root, tmp_path / "b"), ds)   # same seed, another folder: the same weights
    assert r1.built and r2.built and r1.name == "clean_model_fashion_mnist_cnn_s0"
    assert all(torch.equal(a, b) for a, b in zip(weights(m1).values(), weights(m2).values()))
    assert {"model.pt", "metrics.csv", "log.txt", "curves.png"} <= set(r1.meta["files"])
    assert 0 <= r1.meta["test_acc"] <= 1 and r1.meta["identity"]["recipe"]["epochs"] == 6
    # the recipe is the prototype's, whatever the attack's --epochs: reused
    _, r3 = clean_model(clean_cfg(small_root, tmp_path / "a", "--epochs", "1"), ds)
    assert not r3.built
    m4, r4 = clean_model(clean_cfg(small_root, tmp_path / "a", "--resource_seed", "1"), ds)
    assert r4.built and r4.name.endswith("_s1")
    assert not all(torch.equal(a, b) for a, b in zip(weights(m1).values(), weights(m4).values()))
    # made for another dataset (the training labels differ): refused, naming the digest
    other = load_dataset("fashion_mnist", str(small_root))
    other.y_train = other.y_train.flip(0)
    with pytest.raises(UserError, match="another dataset.*train_labels_sha256"):
        clean_model(clean_cfg(small_root, tmp_path / "a"), other)
    # killed after epoch 3: refused without --resume, resumed to the uninterrupted weights with it
    with killed_after_checkpoint(lambda phase, epoch: epoch == 3):
        clean_model(clean_cfg(small_root, tmp_path / "c"), ds)
    assert not (tmp_path / "c" / r1.name).exists()
    with pytest.raises(UserError, match="interrupted"):
        clean_model(clean_cfg(small_root, tmp_path / "c"), ds)
    m5, r5 = clean_model(clean_cfg(small_root, tmp_path / "c"), ds, resume=True)
    assert r5.built and r5.meta.get("resumed") is True
    assert all(torch.equal(a, b) for a, b in zip(weights(m1).values(), weights(m5).values()))


def test_rebuild_option_reads_booleans_and_kinds():
    from utils.resources import rebuild_choice
    assert rebuild_choice("true") is True and rebuild_choice(False) is False
    assert rebuild_choice("lc_pgd,clean_model") == ["clean_model", "lc_pgd"] and rebuild_choice(["lf"]) == ["lf"]
    with pytest.raises(ValueError):
        rebuild_choice("lc-pgd;rm")
