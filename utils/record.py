"""Records (conventions §10): the output folder of a run, written atomically, never silently overwritten, with
a checkpoint for --resume; and the one public loader the defenses use.

A record is complete when summary.json exists (it is written last). Loading never unpickles objects: every
.pt file is read with torch.load(weights_only=True).
"""
import csv
import io
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from utils.config import REPO
from utils.errors import UserError
from utils.io import Tee, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_write_yaml, read_json

FORMAT_VERSION = 1
RECORD_ROOT = REPO / "record"


def record_path(name_or_path) -> Path:
    """--result_file / --save_folder_name: a folder under record/, or a path."""
    p = Path(name_or_path)
    if p.is_absolute() or p.exists() or str(name_or_path).startswith((".", "record" + os.sep)):
        return p
    return RECORD_ROOT / p


def is_complete(path: Path) -> bool:
    return (Path(path) / "summary.json").exists()


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def versions():
    import numpy
    import torchvision
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": str(numpy.__version__)}


class Run:
    """The folder one run writes. Opens it under the overwrite / resume rules, tees the log, keeps metrics rows,
    checkpoints, and finishes the record with summary.json."""

    def __init__(self, path, method: str, cfg: dict, overwrite=False, resume=False, deviations=None, extra=None):
        self.path = Path(path)
        self.method = method
        self.cfg = cfg
        self.rows = []
        self.start = time.time()
        self.earlier_seconds = 0.0   # wall time of the sessions before a --resume
        self._open(overwrite, resume)
        self.fresh = not (self.path / "checkpoint.pt").exists()   # not a resumed run
        self.path.mkdir(parents=True, exist_ok=True)
        self.tee = Tee(self.path / "log.txt")
        self.meta = {"method": method, "format_version": FORMAT_VERSION, "config": cfg,
                     "deviations": deviations or [], **(extra or {}), "command": " ".join(sys.argv),
                     "git_commit": git_commit(), "versions": versions(),
                     "start_time": time.strftime("%Y-%m-%d %H:%M:%S"), "end_time": None}
        atomic_write_yaml(self.path / "config.yaml", self.meta)

    def _open(self, overwrite, resume):
        """The overwrite / resume rules. A folder of ours (config.yaml) without a checkpoint is a run that died before
        its first epoch ended: --resume starts it again (there is nothing to continue), --overwrite too."""
        p = self.path
        if not p.exists():
            if resume:
                print(f"--resume: nothing to resume at {p}; starting a new run")
            return
        if is_complete(p):
            if not overwrite:
                raise UserError(f"a complete record already exists at {p}; pass --overwrite to replace it, "
                                "or choose another name")
            self._remove(p)
            return
        if (p / "checkpoint.pt").exists():
            if resume:
                self._check_same_config(p)
                return
            if not overwrite:
                raise UserError(f"an interrupted run left an incomplete record at {p}; pass --resume to continue it "
                                "or --overwrite to start again")
            self._remove(p)
            return
        ours = (p / "config.yaml").exists()
        if not ours and any(p.iterdir()) and not overwrite:
            names = sorted(f.name for f in p.iterdir())[:5]
            raise UserError(f"{p} exists and holds files that are not a record ({', '.join(names)}); "
                            "pass --overwrite to replace it, or choose another name")
        if ours and not (resume or overwrite):
            raise UserError(f"a run that stopped before its first checkpoint left {p}; pass --resume or --overwrite "
                            "to start it again")
        if ours and resume:
            print(f"--resume: the run at {p} stopped before its first checkpoint; starting it again")
        self._remove(p)

    def _remove(self, p):
        print(f"removing the previous record at {p}")
        shutil.rmtree(p)

    def _check_same_config(self, p):
        try:
            old = yaml.safe_load((p / "config.yaml").read_text())["config"]
        except Exception:
            return
        diff = [k for k in set(old) | set(self.cfg) if k != "device" and old.get(k) != self.cfg.get(k)]
        if diff:
            raise UserError(f"--resume with settings that differ from the interrupted run at {p}: "
                            + ", ".join(f"{k} ({old.get(k)!r} -> {self.cfg.get(k)!r})" for k in sorted(diff))
                            + "; resume with the same settings, or pass --overwrite to start again")

    # --- per-epoch bookkeeping -------------------------------------------------------------------------
    def log_epoch(self, row: dict, label="epoch"):
        self.rows.append(row)
        self.write_metrics()
        shown = [f"{label} {row['epoch']}"]
        for k in ("train_loss", "test_acc", "test_asr", "test_ra"):
            if k in row and row[k] is not None:
                shown.append(f"{k} {row[k]:.4f}")
        extra = [k for k in row if k.startswith("raw_test_") or k in ("disc_auc", "shared_fraction")]
        shown += [f"{k} {row[k]:.4f}" for k in extra if isinstance(row[k], float)]
        shown.append(f"lr {row['lr']:.2e}" if isinstance(row.get("lr"), float) else "")
        shown.append(f"{row['seconds']:.1f}s")
        print(" | ".join(s for s in shown if s))

    def write_metrics(self):
        keys = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())

    def save_checkpoint(self, epoch, state: dict):
        atomic_torch_save({"epoch": epoch, "rows": self.rows, "elapsed": self.elapsed(),
                           "state": {k: v.state_dict() for k, v in state.items() if v is not None}},
                          self.path / "checkpoint.pt")

    def restore_checkpoint(self, state: dict) -> int:
        ck = self.path / "checkpoint.pt"
        if not ck.exists():
            return 0
        try:
            d = torch.load(ck, weights_only=True, map_location="cpu")
            for k, v in state.items():
                if v is not None:
                    v.load_state_dict(d["state"][k])
        except Exception as e:
            raise UserError(f"the checkpoint {ck} cannot be read ({e}); pass --overwrite to start again") from None
        self.rows = d["rows"]
        self.earlier_seconds = float(d.get("elapsed", 0.0))
        print(f"resuming from the checkpoint of epoch {d['epoch']}")
        return int(d["epoch"])

    def elapsed(self) -> float:
        """Wall time of this run, the sessions before a --resume included."""
        return self.earlier_seconds + time.time() - self.start

    def update_meta(self, **entries):
        """Add entries to config.yaml now (not only at the end), so that an interrupted record says them too."""
        self.meta.update(entries)
        atomic_write_yaml(self.path / "config.yaml", self.meta)

    # --- the end ---------------------------------------------------------------------------------------
    def save_model(self, payload: dict, name="model.pt"):
        atomic_torch_save({"format_version": FORMAT_VERSION, **payload}, self.path / name)

    def write_file(self, name, data):
        (atomic_write_bytes if isinstance(data, bytes) else atomic_write_text)(self.path / name, data)

    def finish(self, summary: dict):
        """Write summary.json last: from here on the record is complete."""
        self.meta["end_time"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_yaml(self.path / "config.yaml", self.meta)
        summary = {**summary, "seconds": round(self.elapsed(), 2), "format_version": FORMAT_VERSION}
        atomic_write_json(self.path / "summary.json", summary)
        if (self.path / "checkpoint.pt").exists():
            os.unlink(self.path / "checkpoint.pt")
        self.tee.close()
        return summary

    def close(self):
        """End the run. A new run that stops (bad input found late, Ctrl-C, an error) before its first checkpoint
        leaves nothing to resume: its folder is removed, so the same command can simply be run again."""
        self.tee.close()
        if self.fresh and self.path.exists() and not is_complete(self.path) and not (self.path / "checkpoint.pt").exists():
            shutil.rmtree(self.path, ignore_errors=True)


# --- model files --------------------------------------------------------------------------------------

def model_payload(model, model_name, input_shape, width, dataset):
    return {"model_name": model_name, "num_classes": model.num_classes, "input_shape": list(input_shape),
            "width": width, "dataset": dataset, "mean": model.normalize.mean.flatten().tolist(),
            "std": model.normalize.std.flatten().tolist(), "state_dict": model.state_dict()}


def load_model_file(path, device="cpu"):
    """Rebuild a plain model from a weights-only model.pt. A PDB file (a defended model) is refused here."""
    from models import build_model
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found")
    try:
        d = torch.load(path, weights_only=True, map_location=device)
    except Exception as e:
        raise UserError(f"{path} is not a weights-only model file ({type(e).__name__}); it was not written by this toolkit") from None
    if d.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has record format version {d.get('format_version')}, this toolkit reads version "
                        f"{FORMAT_VERSION}; make the record again with this version")
    if "state_dict" not in d:
        raise UserError(f"{path} holds a defended model ({d.get('defense', 'unknown')}), not plain weights; "
                        "load it with utils.record.load_defense_model")
    c = d["input_shape"][0]
    model = build_model(d["model_name"], d["num_classes"], c, d["mean"], d["std"], d["width"])
    model.load_state_dict(d["state_dict"])
    return model.to(device).eval(), d


def load_defense_model(path, device="cpu"):
    """A defense record's model in eval mode: PDB's DefendedModel, or a plain model (utils/defended_model.py)."""
    from utils.defended_model import load_defense_model as load
    return load(path, device)


# --- the attack record, for the defenses -----------------------------------------------------------------

@dataclass
class AttackRecord:
    path: Path
    config: dict          # the attack's resolved settings
    poison: dict          # poison.json
    summary: dict         # the attack's final figures
    model: torch.nn.Module
    model_info: dict      # model name, width, input shape ... (model.pt without the weights)
    data: "object"        # utils.poison.PoisonedData, rebuilt bit for bit
    dataset: "object"     # utils.data.Dataset


def check_attack_record(result_file) -> Path:
    path = record_path(result_file)
    if not path.is_dir():
        raise UserError(f"no attack record at {path}; make one first, e.g. "
                        f"`python attack/badnet.py --save_folder_name {Path(str(result_file)).name}`")
    if not is_complete(path):
        raise UserError(f"the attack record at {path} is incomplete (the run was interrupted or is still running); "
                        "finish it with the same attack command plus --resume")
    for f in ("config.yaml", "poison.json", "model.pt", "trigger_pattern.png"):
        if not (path / f).exists():
            raise UserError(f"the attack record at {path} lacks {f}; it is damaged: make it again")
    for f in ("summary.json", "poison.json"):
        v = read_json(path / f).get("format_version")
        if v != FORMAT_VERSION:
            raise UserError(f"the record at {path} has format version {v}; this toolkit reads version {FORMAT_VERSION}. "
                            "Make the record again with this version of the toolkit")
    return path


def load_record_model(name, dataset, device="cpu"):
    """The model of an attack record, or of a defense record (a folder under <record>/defense/), checked to be
    trained on `dataset`: weights only, PDB's DefendedModel where that is what the defense saved."""
    path = record_path(name)
    attack = path.parent.parent if path.parent.name == "defense" else path
    check_attack_record(attack)
    trained_on = yaml.safe_load((attack / "config.yaml").read_text())["config"]["dataset"]
    if trained_on != dataset:
        raise UserError(f"model {name} was trained on {trained_on}, the records are {dataset}: "
                        "compare records of one dataset")
    return load_defense_model(path / "model.pt", device)


def load_attack_record(result_file, dataset_path=None, device="cpu") -> AttackRecord:
    """Everything a defense needs: the attacked model, the poisoned training set and test sets (rebuilt from the
    clean dataset, poison.json and trigger_pattern.png, checked against the stored digests) and the metadata."""
    from utils.data import labels_digest, load_dataset
    from utils.poison import PoisonPlan, build_poisoned_data
    from utils.triggers import Trigger, read_pattern_png
    path = check_attack_record(result_file)
    meta = yaml.safe_load((path / "config.yaml").read_text())
    cfg = meta["config"]
    poison = read_json(path / "poison.json")
    dataset = load_dataset(cfg["dataset"], dataset_path or cfg["dataset_path"])
    if labels_digest(dataset.y_train) != poison["digests"]["train_labels_sha256"]:
        raise UserError(f"the {cfg['dataset']} training labels under {dataset_path or cfg['dataset_path']} are not the ones "
                        f"the record at {path} was made with (different order or files); use the same dataset files")
    trigger = Trigger.from_spec(poison["trigger"], read_pattern_png(path / "trigger_pattern.png"))
    plan = PoisonPlan(poison["attack_label_trans"], poison["attack_target"], poison["attack_label_shift_amount"],
                      torch.tensor(poison["reserve_indices"], dtype=torch.int64),
                      torch.tensor(poison["poison_indices"], dtype=torch.int64))
    data = build_poisoned_data(dataset, trigger, plan)
    for k, v in data.digests().items():
        if poison["digests"].get(k) != v:
            raise UserError(f"rebuilding the poisoned data of {path} gave a different {k}; the record or the dataset "
                            "changed since the attack ran")
    model, info = load_model_file(path / "model.pt", device)
    info = {k: v for k, v in info.items() if k not in ("state_dict",)}
    return AttackRecord(path, cfg, poison, read_json(path / "summary.json"), model, info, data, dataset)
