"""Reading records (conventions §10): model files, and the one public loader of an attack record the defenses use.
The folder a run writes, and its rules, are in utils/run_folder.py.

A record is complete when summary.json exists (it is written last). Loading never unpickles objects: every
.pt file is read with torch.load(weights_only=True). A damaged file is one line naming it.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.errors import UserError
from utils.io import load_weights, read_json
from utils.run_folder import FORMAT_VERSION, is_complete, read_record_config, record_path

MODEL_KEYS = ("model_name", "num_classes", "input_shape", "mean", "std")

# --- model files --------------------------------------------------------------------------------------

def model_payload(model, model_name, input_shape, width, dataset):
    return {"model_name": model_name, "num_classes": model.num_classes, "input_shape": list(input_shape),
            "width": width, "dataset": dataset, "mean": model.normalize.mean.flatten().tolist(),
            "std": model.normalize.std.flatten().tolist(), "state_dict": model.state_dict()}


def read_model_file(path, device="cpu") -> dict:
    """A model.pt as its dict (weights only), checked to be this toolkit's format and version."""
    path = Path(path)
    d = load_weights(path, "model file", device)
    if not isinstance(d, dict):
        raise UserError(f"model file {path} holds a {type(d).__name__}, not this toolkit's dict of weights and settings")
    if d.get("format_version") != FORMAT_VERSION:
        raise UserError(f"model file {path} has record format version {d.get('format_version')}, this toolkit reads "
                        f"version {FORMAT_VERSION}; make the record again with this version")
    return d


def build_from_file(d: dict, path, weights_key="state_dict", device="cpu"):
    """The model that a model.pt dict describes, with its weights loaded."""
    from models import build_model
    missing = [k for k in (*MODEL_KEYS, weights_key) if k not in d]
    if missing:
        raise UserError(f"model file {path} lacks {', '.join(missing)}; the file is damaged: make the record again")
    model = build_model(d["model_name"], d["num_classes"], d["input_shape"][0], d["mean"], d["std"], d.get("width"))
    try:
        model.load_state_dict(d[weights_key])
    except (RuntimeError, TypeError, AttributeError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"the weights in model file {path} do not fit a {d['model_name']} ({first}); the file is "
                        "damaged: make the record again") from None
    return model.to(device).eval()


def load_model_file(path, device="cpu"):
    """Rebuild a plain model from a weights-only model.pt. A PDB file (a defended model) is refused here."""
    d = read_model_file(path, device)
    if "state_dict" not in d and "defense" in d:
        raise UserError(f"{path} holds a defended model ({d.get('defense', 'unknown')}), not plain weights; "
                        "load it with utils.record.load_defense_model")
    return build_from_file(d, path, "state_dict", device), d


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


POISON_KEYS = ("attack", "attack_label_trans", "attack_target", "attack_label_shift_amount", "trigger", "digests",
               "poison_indices", "reserve_indices")


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
        v = read_json(path / f, "record file").get("format_version")
        if v != FORMAT_VERSION:
            raise UserError(f"the record at {path} has format version {v}; this toolkit reads version {FORMAT_VERSION}. "
                            "Make the record again with this version of the toolkit")
    return path


def record_dataset(path) -> str:
    """The dataset an attack record was made on (from its config.yaml)."""
    cfg = read_record_config(path)["config"]
    if not isinstance(cfg.get("dataset"), str):
        raise UserError(f"record file {Path(path) / 'config.yaml'} names no dataset; the file is damaged: make the "
                        "record again")
    return cfg["dataset"]


def load_record_model(name, dataset, device="cpu"):
    """The model of an attack record, or of a defense record (a folder under <record>/defense/), checked to be
    trained on `dataset`: weights only, PDB's DefendedModel where that is what the defense saved."""
    path = record_path(name)
    attack = path.parent.parent if path.parent.name == "defense" else path
    check_attack_record(attack)
    trained_on = record_dataset(attack)
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
    cfg = read_record_config(path)["config"]
    poison = read_json(path / "poison.json", "record file")
    for file, d, keys in (("poison.json", poison, POISON_KEYS), ("config.yaml", cfg, ("dataset", "dataset_path"))):
        missing = [k for k in keys if k not in d]
        if missing:
            raise UserError(f"record file {path / file} lacks {', '.join(missing)}; the file is damaged: make the "
                            "record again")
    dataset = load_dataset(cfg["dataset"], dataset_path or cfg["dataset_path"])
    if labels_digest(dataset.y_train) != poison["digests"].get("train_labels_sha256"):
        raise UserError(f"the {cfg['dataset']} training labels under {dataset_path or cfg['dataset_path']} are not the ones "
                        f"the record at {path} was made with (different order or files); use the same dataset files")
    trigger = Trigger.from_spec(poison["trigger"], read_pattern_png(path / "trigger_pattern.png"))
    try:
        plan = PoisonPlan(poison["attack_label_trans"], poison["attack_target"], poison["attack_label_shift_amount"],
                          torch.tensor(poison["reserve_indices"], dtype=torch.int64),
                          torch.tensor(poison["poison_indices"], dtype=torch.int64))
        data = build_poisoned_data(dataset, trigger, plan)
    except (TypeError, ValueError, IndexError, RuntimeError) as e:
        raise UserError(f"poison.json of {path} does not describe a poisoned set of {cfg['dataset']} ({e}); it is "
                        "damaged: make the record again") from None
    for k, v in data.digests().items():
        if poison["digests"].get(k) != v:
            raise UserError(f"rebuilding the poisoned data of {path} gave a different {k}; the record or the dataset "
                            "changed since the attack ran")
    model, info = load_model_file(path / "model.pt", device)
    info = {k: v for k, v in info.items() if k not in ("state_dict",)}
    return AttackRecord(path, cfg, poison, read_json(path / "summary.json", "record file"), model, info, data, dataset)
