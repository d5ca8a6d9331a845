"""Exchange records with BackdoorBench (github.com/SCLBD/BackdoorBench): bring its attack records in, so that every
defense here runs on them, and take ours out, so that its defenses and analysis scripts run on ours.

    python interop/backdoorbench.py import PATH --save_folder_name X      # PATH: a BackdoorBench record folder
    python interop/backdoorbench.py export RECORD OUT [--disk]            # OUT/attack_result.pt (RAM mode by default)
    python interop/backdoorbench.py export-defense RECORD/defense/M OUT   # OUT/defense_result.pt, M_df.csv, M_df_summary.csv

The format (BackdoorBench's utils/save_load_attack.py and utils/bd_dataset_v2.py): attack_result.pt is a dict
{model_name, num_classes, model (a state_dict), data_path, img_size (H, W, C), clean_data (the dataset), bd_train,
bd_test}; bd_train and bd_test are the state of a poisoned dataset: {bd_data_container: {save_folder_path,
data_dict, save_file_format}, original_index_array, poison_indicator, getitem_all, getitem_all_switch,
save_folder_path}. data_dict maps a clean-split index to {"path": PNG, "other_info": [bd_label, orig_label]} (disk
mode) or to (image, bd_label, orig_label) (RAM mode). Normalisation lives in BackdoorBench's transforms, not its
models: its preactresnet18 is ours without `normalize.*` and with `head.*` named `linear.*`.

Reading is safe: torch.load(weights_only=True) with an allowlist of exactly the numpy types the format needs, so a
record carrying any other object (a pickled PIL image of the v1 format, a payload) is refused and nothing in it
runs; the PNG paths inside a record are only followed inside its own folder.
"""
import argparse
import csv
import hashlib
import io
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from models import build_model
from utils.data import load_dataset
from utils.engine.device import Precision
from utils.engine.evaluate import EvalSets, breakdown_summary, evaluate_backdoor
from utils.errors import UserError, run_main
from utils.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, read_bytes, read_json
from utils.model_file import model_payload, read_model_file
from utils.poison import PoisonPlan, build_poisoned_data
from utils.record import check_attack_record, load_attack_record
from utils.record_names import FORMAT_VERSION, record_path
from utils.run_folder import Run
from utils.triggers import StoredTrigger, trigger_file_bytes

MODEL = "preactresnet18"          # the one architecture both toolkits share key for key
DATASETS_SHARED = ("cifar10", "cifar100", "gtsrb", "tiny")   # BackdoorBench's MNIST is 3-channel, ours is not


# --- reading BackdoorBench's pickles safely ------------------------------------------------------------------------

def numpy_allowlist():
    """The numpy objects a BackdoorBench record pickles (arrays, dtypes, scalars), under their numpy-2 and numpy-1
    module names; nothing else."""
    mod = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(mod, name)
        out += [(fn, f"numpy._core.multiarray.{name}"), (fn, f"numpy.core.multiarray.{name}")]
    out += [type(np.dtype(t)) for t in ("b1", "u1", "i1", "i2", "i4", "i8", "u2", "u4", "u8", "f2", "f4", "f8")]
    return out


def safe_load(path, what="BackdoorBench record"):
    """torch.load(weights_only=True) with the numpy allowlist; anything else in the file is refused, never run."""
    raw = read_bytes(path, what)
    try:
        with torch.serialization.safe_globals(numpy_allowlist()):
            return torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as e:   # torch names the refused global: "Unsupported global: GLOBAL PIL.Image.Image ..."
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        found = m.group(1) if m else None
        if found and found.startswith("PIL"):
            raise UserError(f"{path} holds pickled PIL images ({found}): a BackdoorBench v1-format record, which cannot "
                            "be read without running its pickles; re-save it with BackdoorBench v2 (disk or RAM mode "
                            "with arrays)") from None
        raise UserError(f"{path} holds objects outside the BackdoorBench format ({found or type(e).__name__}); it was "
                        "not loaded and nothing in it ran") from None


# --- the weights ----------------------------------------------------------------------------------------------

def weights_from_bb(sd: dict, model) -> dict:
    """BackdoorBench preactresnet18 state_dict (with or without DataParallel's `module.`) -> ours."""
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
    sd = {("head." + k[7:] if k.startswith("linear.") else k): v for k, v in sd.items()}
    ours = model.state_dict()
    out = {k: v for k, v in ours.items() if k.startswith("normalize.")}
    missing = [k for k in ours if k not in out and k not in sd]
    extra = [k for k in sd if k not in ours]
    if missing or extra:
        raise UserError(f"the record's weights are not BackdoorBench's preactresnet18 (missing {missing[:3]}, "
                        f"unexpected {extra[:3]})")
    for k in ours:
        if k in sd:
            if tuple(sd[k].shape) != tuple(ours[k].shape):
                raise UserError(f"weight {k} has shape {tuple(sd[k].shape)}, {MODEL} needs {tuple(ours[k].shape)}")
            out[k] = torch.as_tensor(sd[k])
    return out


def weights_to_bb(sd: dict) -> dict:
    return {("linear." + k[5:] if k.startswith("head.") else k): v.detach().cpu().clone()
            for k, v in sd.items() if not k.startswith("normalize.")}


# --- the poisoned splits --------------------------------------------------------------------------------------

def inside(folder: Path, anchor: str, stored: str) -> Path:
    """A PNG path as BackdoorBench stored it (relative to its own root, or absolute on the v2 branch), found in the
    record folder: the part from the split's folder name on. Never a file outside the record folder."""
    parts = Path(stored).parts
    if anchor not in parts:
        raise UserError(f"image path {stored!r} does not lie in the record's {anchor}/ folder; the record is damaged")
    p = (folder / Path(*parts[parts.index(anchor):])).resolve()
    if not p.is_relative_to(folder.resolve()):
        raise UserError(f"image path {stored!r} leads outside the record folder {folder}; refused")
    return p


def read_png(path: Path) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise UserError(f"image {path} cannot be read ({e}); the record is incomplete: copy its folders too") from None


def split_samples(state: dict, folder: Path, split: str):
    """(indices, images uint8 (n, C, H, W), bd labels, original labels) of the poisoned samples of one split."""
    try:
        container = state["bd_data_container"]
        data = container["data_dict"]
        indicator = np.asarray(state["poison_indicator"])
        exposed = np.asarray(state["original_index_array"], dtype=np.int64)
    except (KeyError, TypeError) as e:
        raise UserError(f"bd_{split} of the record lacks {e}; it is not a BackdoorBench v2 dataset state") from None
    keys = exposed[indicator[exposed] == 1] if split == "train" else exposed
    anchor = Path(str(container.get("save_folder_path") or f"bd_{split}_dataset")).name
    idx, images, bd_labels, labels = [], [], [], []
    for i in keys.tolist():
        v = data.get(i)   # numpy int64 keys hash and compare as ints
        if v is None:
            raise UserError(f"bd_{split}: sample {i} is marked poisoned but has no entry in data_dict")
        if isinstance(v, dict):          # disk mode
            img = read_png(inside(folder, anchor, str(v["path"])))
            bd, y = v["other_info"][:2]
        else:                            # RAM mode: (image, bd_label, orig_label)
            img, bd, y = v[:3]
            img = np.asarray(img)
        if img.ndim == 2:
            img = img[:, :, None]
        idx.append(i)
        images.append(torch.tensor(np.asarray(img, dtype=np.uint8)).permute(2, 0, 1))
        bd_labels.append(int(bd))
        labels.append(int(y))
    order = np.argsort(idx, kind="stable")
    t = lambda a: torch.tensor([a[j] for j in order], dtype=torch.int64)   # noqa: E731
    x = torch.stack([images[j] for j in order]) if images else torch.empty(0, dtype=torch.uint8)
    return t(idx), x, t(bd_labels), t(labels)


def check_alignment(split, idx, images, labels, x_clean, y_clean, name):
    """BackdoorBench's indices are positions in the clean split: the original labels must be ours at those
    positions, and each poisoned image must resemble our clean image there far more than another one."""
    if len(idx) == 0:
        return
    if int(idx.max()) >= len(y_clean):
        raise UserError(f"bd_{split} refers to index {int(idx.max())} but our {name} {split} split has {len(y_clean)} "
                        "samples: the record was made on other dataset files")
    wrong = int((y_clean[idx] != labels).sum())
    if wrong:
        raise UserError(f"{wrong} of the {len(idx)} poisoned {split} samples have another label in our {name} at the "
                        "same index: the dataset files or their order differ from BackdoorBench's; use the same files")
    if tuple(images.shape[1:]) != tuple(x_clean.shape[1:]):
        raise UserError(f"the record's {split} images are {tuple(images.shape[1:])}, our {name} images "
                        f"{tuple(x_clean.shape[1:])}")
    if len(idx) > 1:
        pick = torch.arange(0, len(idx), max(1, len(idx) // 64))
        a = images[pick].float()
        same = (a - x_clean[idx[pick]].float()).abs().mean((1, 2, 3)).median()
        other = (a - x_clean[idx[pick.roll(1)]].float()).abs().mean((1, 2, 3)).median()
        if same >= 0.5 * other:
            raise UserError(f"the poisoned {split} images do not resemble our {name} images at the same indices "
                            f"(mean difference {same:.1f} vs {other:.1f} to other images): the dataset files or "
                            "their order differ from BackdoorBench's")


def label_mode(bd_labels, labels, k):
    """all2one with its target, or all2all with its shift, from the poisoned test labels."""
    if len(bd_labels) and bool((bd_labels == bd_labels[0]).all()):
        return "all2one", int(bd_labels[0]), 1
    shift = (bd_labels - labels) % k
    if len(shift) and bool((shift == shift[0]).all()) and int(shift[0]) != 0:
        return "all2all", 0, int(shift[0])
    raise UserError("the poisoned test labels follow neither all2one nor all2all; this importer knows those two")


def read_info(folder: Path) -> dict:
    """info.pickle (BackdoorBench's args, saved with torch.save): read only if plain values suffice."""
    f = folder / "info.pickle"
    if not f.exists():
        return {}
    try:
        d = safe_load(f, "info.pickle")
        return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None)))} \
            if isinstance(d, dict) else {}
    except UserError as e:
        print(f"note: info.pickle not used ({e})")
        return {}


# --- import ---------------------------------------------------------------------------------------------------

def import_record(src, save_folder_name, dataset_path="data", attack=None, overwrite=False):
    t0 = time.time()
    folder = Path(src)
    file = folder / "attack_result.pt" if folder.is_dir() else folder
    folder = file.parent
    d = safe_load(file)
    need = ("model_name", "num_classes", "model", "img_size", "clean_data", "bd_train", "bd_test")
    if not isinstance(d, dict) or any(k not in d for k in need):
        raise UserError(f"{file} is not a BackdoorBench attack record (it needs the keys {', '.join(need)})")
    name = str(d["clean_data"])
    if name not in DATASETS_SHARED:
        raise UserError(f"dataset {name!r}: this importer knows BackdoorBench's {', '.join(DATASETS_SHARED)}")
    if d["model_name"] != MODEL:
        raise UserError(f"model {d['model_name']!r}: only {MODEL} is the same architecture in both toolkits "
                        "(BackdoorBench's resnet18 and vgg19_bn are torchvision's ImageNet variants)")
    if d["bd_train"] is None:
        print("note: the record has no bd_train (some attacks save none): defenses that need the poisoned training "
              "set see the clean one")
    info_args = read_info(folder)
    attack_name = attack or info_args.get("attack") or folder.name.split("_")[0]
    dataset = load_dataset(name, dataset_path)
    info = dataset.info
    k = info.num_classes
    if int(d["num_classes"]) != k:
        raise UserError(f"the record has {d['num_classes']} classes, {name} has {k}")
    empty = (torch.empty(0, dtype=torch.int64),) * 4
    tr = split_samples(d["bd_train"], folder, "train") if d["bd_train"] is not None else \
        (empty[0], torch.empty(0, *info.shape, dtype=torch.uint8), empty[0], empty[0])
    te = split_samples(d["bd_test"], folder, "test")
    check_alignment("train", tr[0], tr[1], tr[3], dataset.x_train, dataset.y_train, name)
    check_alignment("test", te[0], te[1], te[3], dataset.x_test, dataset.y_test, name)
    trans, target, shift = label_mode(te[2], te[3], k)
    trigger = StoredTrigger(tr[0], tr[1], te[0], te[1])
    plan = PoisonPlan(trans, target, shift, torch.empty(0, dtype=torch.int64), tr[0], False, 0,
                      poison_labels=tr[2], bd_test_indices=te[0], bd_test_labels=te[2])
    data = build_poisoned_data(dataset, trigger, plan)
    model = build_model(MODEL, k, info.shape[0], info.mean, info.std, 64)
    model.load_state_dict(weights_from_bb(d["model"], model))
    kept = int((tr[2] == tr[3]).sum())
    cfg = {"save_folder_name": save_folder_name, "dataset": name, "dataset_path": str(dataset_path), "model": MODEL,
           "model_width": 64, "pratio": round(len(tr[0]) / len(dataset.y_train), 6), "attack_label_trans": trans,
           "attack_target": target, "attack_label_shift_amount": shift, "random_seed": 0,
           "device": "cpu", "checkpoint_every": 1}
    source = {"path": str(folder.resolve()), "attack_result_sha256": hashlib.sha256(read_bytes(file)).hexdigest(),
              "info": info_args}
    run = Run(record_path(save_folder_name), f"backdoorbench:{attack_name}", cfg, overwrite=overwrite,
              extra={"imported_from": source},
              deviations=["imported from BackdoorBench: trained there, its recipe is BackdoorBench's"])
    try:
        tensors = trigger_file_bytes(trigger)
        run.write_file("trigger.safetensors", tensors)
        spec = {**trigger.spec(), "tensors_file": "trigger.safetensors",
                "tensors_sha256": hashlib.sha256(tensors).hexdigest()}
        atomic_write_json(run.path / "poison.json", {
            "format_version": FORMAT_VERSION, "attack": f"backdoorbench:{attack_name}", "dataset": name,
            "attack_label_trans": trans, "attack_target": target, "attack_label_shift_amount": shift,
            "clean_label": False, "trigger_seed": 0, "pratio": cfg["pratio"], "n_poison": len(tr[0]),
            "n_poison_label_kept": kept, "trigger": spec, "reserve_ratio": 0.0, "reserve_rule": "random",
            "digests": data.digests(), "poison_indices": tr[0].tolist(), "poison_labels": tr[2].tolist(),
            "reserve_indices": [], "bd_test_indices": te[0].tolist(), "bd_test_labels": te[2].tolist()})
        run.save_model(model_payload(model, MODEL, info.shape, 64, name))
        m = evaluate_backdoor(model.eval(), EvalSets(data, "cpu"), Precision(torch.device("cpu"), False, False))
        summary = run.finish({"attack": f"backdoorbench:{attack_name}", "dataset": name, "model": MODEL,
                              "pratio": cfg["pratio"], "test_acc": m["test_acc"], "test_asr": m["test_asr"],
                              "test_ra": m["test_ra"], **breakdown_summary(m), "imported_from": str(folder)})
    finally:
        run.close()
    print(f"imported {folder} as {run.path} in {time.time() - t0:.1f}s: {len(tr[0])} poisoned training samples"
          f"{f' ({kept} keep their label)' if kept else ''}, {len(te[0])} poisoned test samples, {trans}"
          f"{f' target {target}' if trans == 'all2one' else f' shift {shift}'}; ACC {summary['test_acc']:.4f} "
          f"ASR {summary['test_asr']:.4f} RA {summary['test_ra']:.4f}")
    return summary


# --- export ---------------------------------------------------------------------------------------------------

def check_exportable(model_info, dataset, what):
    if dataset not in DATASETS_SHARED:
        raise UserError(f"{what} is on {dataset}; BackdoorBench has no such dataset here (exportable: "
                        f"{', '.join(DATASETS_SHARED)})")
    if model_info.get("model_name") != MODEL or model_info.get("width") not in (None, 64):
        raise UserError(f"{what} is a {model_info.get('model_name')} (width {model_info.get('width')}); BackdoorBench "
                        f"can rebuild only {MODEL} at width 64 from this toolkit's records")


def split_state(indices, images, bd_labels, labels, n_split, exposed, folder, split, disk):
    """A BackdoorBench dataset state: RAM mode holds (HWC uint8 array, bd_label, label) per index; disk mode writes
    bd_<split>_dataset/<label>/<index>.png and stores the paths as BackdoorBench does (relative to its root)."""
    sub = f"bd_{split}_dataset"
    data = {}
    for i, img, bd, y in zip(indices.tolist(), images, bd_labels.tolist(), labels.tolist()):
        hwc = img.permute(1, 2, 0).numpy()
        if disk:
            from PIL import Image
            path = folder / sub / str(y) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(hwc if hwc.shape[2] == 3 else hwc[:, :, 0]).save(buf, format="PNG")
            atomic_write_bytes(path, buf.getvalue())
            data[np.int64(i)] = {"path": f"./record/{folder.name}/{sub}/{y}/{i}.png", "other_info": [bd, y]}
        else:
            data[np.int64(i)] = (np.ascontiguousarray(hwc), bd, y)
    indicator = np.zeros(n_split, dtype=np.float64)
    indicator[indices.numpy()] = 1
    save = f"./record/{folder.name}/{sub}" if disk else None
    return {"bd_data_container": {"save_folder_path": save, "data_dict": data, "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False, "original_index_array": np.asarray(exposed, np.int64),
            "poison_indicator": indicator, "save_folder_path": save}


def export_record(record, out, disk=False):
    t0 = time.time()
    rec = load_attack_record(record)
    name = rec.config["dataset"]
    check_exportable(rec.model_info, name, f"the record {rec.path}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "attack_result.pt").exists():
        raise UserError(f"{out / 'attack_result.pt'} exists; choose another folder (nothing was changed)")
    data, info = rec.data, rec.dataset.info
    p = data.poison_indicator == 1
    train_idx = torch.nonzero(p).flatten()
    state = {
        "model_name": MODEL, "num_classes": info.num_classes, "model": weights_to_bb(rec.model.state_dict()),
        "data_path": f"./data/{name}", "img_size": [info.shape[1], info.shape[2], info.shape[0]], "clean_data": name,
        "bd_train": split_state(train_idx, data.x_train[train_idx], data.y_train[train_idx],
                                data.y_train_true[train_idx], len(data.y_train), np.arange(len(data.y_train)), out,
                                "train", disk),
        "bd_test": split_state(data.bd_test_indices, data.x_bd_test, data.y_bd_test, data.y_bd_test_true,
                               len(data.y_test), data.bd_test_indices.numpy(), out, "test", disk)}
    atomic_torch_save(state, out / "attack_result.pt")
    size = (out / "attack_result.pt").stat().st_size
    print(f"exported {rec.path} to {out}/attack_result.pt ({'disk' if disk else 'RAM'} mode, {size / 2**20:.1f} MiB) "
          f"in {time.time() - t0:.1f}s; put the folder under BackdoorBench's record/ and the dataset under its data/")
    return out / "attack_result.pt"


BB_COLUMNS = {"train_loss": "train_epoch_loss_avg_over_batch", "train_acc": "train_acc",
              "clean_test_loss": "clean_test_loss_avg_over_batch", "bd_test_loss": "bd_test_loss_avg_over_batch",
              "test_acc": "test_acc", "test_asr": "test_asr", "test_ra": "test_ra", "epoch": "epoch"}


def export_defense(defense_record, out):
    path = record_path(defense_record)
    if path.parent.name != "defense":
        raise UserError(f"{path} is not a defense record (expected <attack record>/defense/<method>)")
    attack = check_attack_record(path.parent.parent)
    if not (path / "summary.json").exists():
        raise UserError(f"the defense record {path} is incomplete")
    d = read_model_file(path / "model.pt")
    if "state_dict" not in d:
        raise UserError(f"{path} holds a {d.get('defense', 'wrapped')} model (input stamp and output mapping): "
                        "BackdoorBench would evaluate the raw, undefended network inside it; not exported")
    dataset = read_json(attack / "summary.json", "record file").get("dataset")
    check_exportable({"model_name": d.get("model_name"), "width": d.get("width")}, dataset, f"the record {path}")
    method = path.name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "defense_result.pt").exists():
        raise UserError(f"{out / 'defense_result.pt'} exists; choose another folder (nothing was changed)")
    atomic_torch_save({"model_name": MODEL, "num_classes": d["num_classes"], "model": weights_to_bb(d["state_dict"])},
                      out / "defense_result.pt")
    with open(path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    table = [{bb: r.get(ours, "") for ours, bb in BB_COLUMNS.items()} for r in rows]
    cols = list(BB_COLUMNS.values())
    write_csv(out / f"{method}_df.csv", cols, table, index=True)
    # BackdoorBench's Metric_Aggregator.summary(): per column the last value, the largest valid one, any nan
    values = {c: [float(r[c]) for r in table if r[c] not in ("", None) and not math.isnan(float(r[c]))] for c in cols}
    summary = [{"": "last", **{c: table[-1][c] for c in cols}},
               {"": "valid_max", **{c: max(values[c]) if values[c] else "" for c in cols}},
               {"": "exist_nan_value", **{c: len(values[c]) < len(table) for c in cols}}]
    write_csv(out / f"{method}_df_summary.csv", [""] + cols, summary)
    print(f"exported {path} to {out}: defense_result.pt, {method}_df.csv, {method}_df_summary.csv")
    return out


def write_csv(path, cols, rows, index=False):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(([""] if index else []) + cols)
    for i, r in enumerate(rows):
        w.writerow(([i] if index else []) + [r[c] for c in cols])
    atomic_write_text(path, buf.getvalue())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="a BackdoorBench attack record -> a record of this toolkit")
    i.add_argument("path", help="the BackdoorBench record folder (holding attack_result.pt)")
    i.add_argument("--save_folder_name", required=True)
    i.add_argument("--dataset_path", default="data")
    i.add_argument("--attack", default=None, help="the attack's name (default: info.pickle's, else the folder's)")
    i.add_argument("--overwrite", action="store_true")
    e = sub.add_parser("export", help="an attack record of this toolkit -> BackdoorBench's attack_result.pt")
    e.add_argument("record")
    e.add_argument("out")
    e.add_argument("--disk", action="store_true", help="BackdoorBench's disk mode: PNG folders beside the file")
    x = sub.add_parser("export-defense", help="a defense record -> defense_result.pt and BackdoorBench's csv files")
    x.add_argument("record")
    x.add_argument("out")
    a = p.parse_args(argv)
    if a.command == "import":
        return import_record(a.path, a.save_folder_name, a.dataset_path, a.attack, a.overwrite)
    if a.command == "export":
        return export_record(a.record, a.out, a.disk)
    return export_defense(a.record, a.out)


if __name__ == "__main__":
    run_main(main)
