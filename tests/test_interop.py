"""BackdoorBench interop (interop/backdoorbench.py) on records the tests write in BackdoorBench's format: disk and
RAM mode, a `module.` prefix, numpy-1 pickle names, v2 absolute paths, bd_train None, WaNet-style noise samples;
refusals (v1 PIL pickles, a payload that must never run, paths leaving the folder, misaligned data); and the round
trip: export, import, export, import gives the same record, and FST on the imported record equals FST on ours."""
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from interop import backdoorbench as bb
from models import build_model
from utils.data import DATASETS
from utils.errors import UserError

CIFAR = DATASETS["cifar10"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A fake CIFAR-10 (200 training, 100 test images) in the python-batches format."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 40) for i in range(1, 6)] + [("test_batch", 100)]:
        labels = [int(v) for v in g.integers(0, 10, n)]
        data = g.integers(0, 200, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    return root


def clean_split(root, split):
    from utils.data import load_dataset
    d = load_dataset("cifar10", root, download=False)
    return (d.x_train, d.y_train) if split == "train" else (d.x_test, d.y_test)


def patched(x):
    x = x.clone()
    x[:, :, -3:, -3:] = 255
    return x


def bb_weights(prefix=""):
    torch.manual_seed(0)
    m = build_model("preactresnet18", 10, 3, CIFAR.mean, CIFAR.std, 64)
    return {prefix + k: v for k, v in bb.weights_to_bb(m.state_dict()).items()}, m


def write_bb_record(folder, root, mode="disk", prefix="", absolute=False, bd_train=True, noise=0, target=0,
                    n_train=200, n_test=100):
    """A BackdoorBench v2 attack record: BadNets-style patch, all2one to `target`, 10 % of the training set
    (bench/interop.py writes a CIFAR-10-sized one with it)."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    x_tr, y_tr = clean_split(root, "train")
    x_te, y_te = clean_split(root, "test")

    def state(x, y, idx, n, exposed, sub, labels):
        data = {}
        for i, lab in zip(idx, labels):
            img = patched(x[i:i + 1])[0] if lab != int(y[i]) or i not in noise_set else x[i] + 1
            hwc = img.permute(1, 2, 0).numpy()
            if mode == "disk":
                from PIL import Image
                p = folder / sub / str(int(y[i])) / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(hwc).save(p)
                stored = str(p) if absolute else f"./record/{folder.name}/{sub}/{int(y[i])}/{i}.png"
                data[np.int64(i)] = {"path": stored, "other_info": [int(lab), int(y[i])]}
            else:
                data[np.int64(i)] = (np.ascontiguousarray(hwc), int(lab), int(y[i]))
        ind = np.zeros(n)
        ind[list(idx)] = 1
        save = (str(folder / sub) if absolute else f"./record/{folder.name}/{sub}") if mode == "disk" else None
        return {"bd_data_container": {"save_folder_path": save, "data_dict": data, "save_file_format": ".png"},
                "original_index_array": np.asarray(exposed, dtype=np.int64), "poison_indicator": ind,
                "getitem_all": True, "getitem_all_switch": False, "save_folder_path": save}

    poison = [i for i in range(0, n_train, 10)]
    noise_set = set(range(5, 5 + 10 * noise, 10))           # WaNet's noise samples: changed, label kept
    train_idx = sorted(poison + sorted(noise_set))
    train_labels = [int(y_tr[i]) if i in noise_set else target for i in train_idx]
    test_idx = [i for i in range(n_test) if int(y_te[i]) != target]
    sd, model = bb_weights(prefix)
    record = {"model_name": "preactresnet18", "num_classes": 10, "model": sd, "data_path": "./data/cifar10",
              "img_size": [32, 32, 3], "clean_data": "cifar10",
              "bd_train": state(x_tr, y_tr, train_idx, n_train, np.arange(n_train), "bd_train_dataset", train_labels)
              if bd_train else None,
              "bd_test": state(x_te, y_te, test_idx, n_test, test_idx, "bd_test_dataset", [target] * len(test_idx))}
    torch.save(record, folder / "attack_result.pt")
    torch.save({"attack": "badnet", "pratio": 0.1, "device": "cpu"}, folder / "info.pickle")
    return folder, model, train_idx, test_idx


def records(tmp_path):
    return tmp_path / "record"


@pytest.mark.parametrize("mode,prefix,absolute", [("disk", "", False), ("ram", "module.", False),
                                                   ("disk", "", True)])
def test_import_reads_disk_and_ram_mode_prefixes_and_absolute_paths(tmp_path, cifar_root, mode, prefix, absolute):
    src, model, train_idx, test_idx = write_bb_record(tmp_path / "bb" / "badnet_0_1", cifar_root, mode, prefix,
                                                      absolute)
    out = tmp_path / "ours"
    s = bb.import_record(src, str(out), cifar_root)
    poison = json.loads((out / "poison.json").read_text())
    assert poison["attack"] == "backdoorbench:badnet" and poison["poison_indices"] == train_idx
    assert poison["bd_test_indices"] == test_idx and poison["attack_target"] == 0
    from utils.record import load_attack_record
    rec = load_attack_record(out, cifar_root)
    x_tr, _ = clean_split(cifar_root, "train")
    assert torch.equal(rec.data.x_train[train_idx], patched(x_tr[train_idx]))      # the images, pixel for pixel
    assert (rec.data.y_train[train_idx] == 0).all() and rec.data.poison_indicator.sum() == len(train_idx)
    assert all(torch.equal(rec.model.state_dict()[k], v) for k, v in model.state_dict().items())
    assert 0 <= s["test_asr"] <= 1


def test_numpy_one_names_and_noise_samples_and_no_bd_train(tmp_path, cifar_root):
    src, *_ = write_bb_record(tmp_path / "bb" / "wanet_rec", cifar_root, "ram", noise=3)
    f = src / "attack_result.pt"
    with zipfile.ZipFile(f) as z:                          # what numpy 1 wrote: numpy.core.multiarray
        items = {n: z.read(n) for n in z.namelist()}
    renamed = {n: (b.replace(b"numpy._core.multiarray", b"numpy.core.multiarray") if n.endswith("data.pkl") else b)
               for n, b in items.items()}
    assert any(b"numpy.core.multiarray" in b for b in renamed.values())
    with zipfile.ZipFile(f, "w") as z:
        for n, b in renamed.items():
            z.writestr(n, b)
    bb.import_record(src, str(tmp_path / "w"), cifar_root, attack="wanet")
    poison = json.loads((tmp_path / "w" / "poison.json").read_text())
    _, y_tr = clean_split(cifar_root, "train")
    target_class_poisoned = sum(int(y_tr[i]) == 0 for i in range(0, 200, 10))   # all2one keeps these labels too
    assert poison["n_poison_label_kept"] == 3 + target_class_poisoned and poison["attack"] == "backdoorbench:wanet"
    src2, *_ = write_bb_record(tmp_path / "bb" / "nobd", cifar_root, "ram", bd_train=False)
    bb.import_record(src2, str(tmp_path / "nb"), cifar_root)
    assert json.loads((tmp_path / "nb" / "poison.json").read_text())["poison_indices"] == []


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(PAYLOAD_MARK),))


PAYLOAD_MARK = "/tmp/bb_interop_payload_ran"


def test_v1_pil_records_and_payloads_are_refused_and_nothing_runs(tmp_path, cifar_root):
    from PIL import Image
    folder = tmp_path / "v1"
    folder.mkdir()
    torch.save({"model_name": "preactresnet18", "bd_test": {"data": [Image.new("RGB", (32, 32))]}},
               folder / "attack_result.pt")
    with pytest.raises(UserError, match="PIL.*v1-format"):
        bb.import_record(folder, str(tmp_path / "x"), cifar_root)
    Path(PAYLOAD_MARK).unlink(missing_ok=True)
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"model": Payload()}, evil / "attack_result.pt")
    with pytest.raises(UserError, match="outside the BackdoorBench format.*nothing in it ran"):
        bb.import_record(evil, str(tmp_path / "y"), cifar_root)
    assert not Path(PAYLOAD_MARK).exists()
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_paths_outside_the_folder_misaligned_data_and_unknown_models_are_refused(tmp_path, cifar_root):
    src, *_ = write_bb_record(tmp_path / "bb" / "rec", cifar_root, "disk")
    d = torch.load(src / "attack_result.pt", weights_only=False)
    key = next(iter(d["bd_test"]["bd_data_container"]["data_dict"]))
    d["bd_test"]["bd_data_container"]["data_dict"][key]["path"] = "./record/rec/bd_test_dataset/../../../secret.png"
    torch.save(d, src / "attack_result.pt")
    with pytest.raises(UserError, match="outside the record folder"):
        bb.import_record(src, str(tmp_path / "a"), cifar_root)

    src, *_ = write_bb_record(tmp_path / "bb" / "rec2", cifar_root, "ram")
    d = torch.load(src / "attack_result.pt", weights_only=False)
    d["bd_train"]["bd_data_container"]["data_dict"] = {
        np.int64(i + 1): v for i, v in d["bd_train"]["bd_data_container"]["data_dict"].items()}   # shifted by one
    ind = np.zeros(200)
    ind[[int(i) for i in d["bd_train"]["bd_data_container"]["data_dict"]]] = 1
    d["bd_train"]["poison_indicator"] = ind
    torch.save(d, src / "attack_result.pt")
    with pytest.raises(UserError, match="another label .* same index|do not resemble"):
        bb.import_record(src, str(tmp_path / "b"), cifar_root)

    d["model_name"] = "resnet18"
    torch.save(d, src / "attack_result.pt")
    with pytest.raises(UserError, match="only preactresnet18"):
        bb.import_record(src, str(tmp_path / "c"), cifar_root)


@pytest.fixture(scope="module")
def native(tmp_path_factory, cifar_root):
    """A BadNets record of this toolkit on the fake CIFAR-10: PreAct-ResNet-18 at width 64, one short epoch."""
    from attack import badnet
    path = tmp_path_factory.mktemp("native") / "badnet_cifar"
    badnet.main(["--dataset", "cifar10", "--dataset_path", str(cifar_root), "--model", "preactresnet18",
                 "--save_folder_name", str(path), "--epochs", "1", "--batch_size", "50", "--amp", "false",
                 "--channels_last", "false", "--eval_batch_size", "256"])
    return path


def test_export_import_round_trip_and_fst_gives_the_same_result(tmp_path, cifar_root, native):
    from defense import ft
    out1 = tmp_path / "bbrec" / "badnet_export"
    bb.export_record(native, out1)
    back1 = tmp_path / "back1"
    bb.import_record(out1, str(back1), cifar_root)
    out2 = tmp_path / "bbrec" / "again"
    bb.export_record(back1, out2, disk=True)
    assert any((out2 / "bd_train_dataset").rglob("*.png"))
    back2 = tmp_path / "back2"
    bb.import_record(out2, str(back2), cifar_root)
    p1, p2 = (json.loads((b / "poison.json").read_text()) for b in (back1, back2))
    assert p1["digests"] == p2["digests"] and p1["poison_indices"] == p2["poison_indices"]
    native_p = json.loads((native / "poison.json").read_text())
    assert p1["digests"] == native_p["digests"]           # the same poisoned images as the native record's
    w = [torch.load(b / "model.pt", weights_only=True)["state_dict"] for b in (native, back1, back2)]
    assert all(torch.equal(w[0][k], w[i][k]) for i in (1, 2) for k in w[0])

    args = ["--ft_mode", "fst", "--epochs", "1", "--split_ratio", "0.1", "--batch_size", "10", "--amp", "false",
            "--channels_last", "false", "--eval_batch_size", "256"]
    a = ft.main(["--result_file", str(native), *args])
    b = ft.main(["--result_file", str(back1), *args, "--dataset_path", str(cifar_root)])
    for k in ("test_acc", "test_asr", "test_ra", "attack_test_acc", "attack_test_asr"):
        assert a[k] == b[k], k

    # a defense record goes out as BackdoorBench's files
    dfolder = bb.export_defense(native / "defense" / "fst", tmp_path / "bbdef")
    d = torch.load(dfolder / "defense_result.pt", weights_only=True)
    assert set(d) == {"model_name", "num_classes", "model"} and "linear.weight" in d["model"]
    summary = (dfolder / "fst_df_summary.csv").read_text().splitlines()
    assert summary[0].split(",")[:2] == ["", "train_epoch_loss_avg_over_batch"] and summary[1].startswith("last,")


def test_export_refuses_what_backdoorbench_cannot_rebuild(tmp_path, tiny_record):
    with pytest.raises(UserError, match="fashion_mnist.*BackdoorBench has no such dataset"):
        bb.export_record(tiny_record, tmp_path / "o")


def test_the_command_line(tmp_path, cifar_root):
    import subprocess
    import sys
    src, *_ = write_bb_record(tmp_path / "bb" / "cli", cifar_root, "ram")
    r = subprocess.run([sys.executable, "interop/backdoorbench.py", "import", str(src), "--save_folder_name",
                        str(tmp_path / "cli_rec"), "--dataset_path", str(cifar_root)],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "interop/backdoorbench.py", "import", str(tmp_path / "nothing"),
                        "--save_folder_name", str(tmp_path / "z")], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
