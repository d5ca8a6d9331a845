"""Reading attack records (conventions §10): the one public loader of an attack record the defenses use. The folder a
run writes, and its rules, are in utils/run_folder.py and utils/record_names.py; model files in utils/model_file.py.

A record is complete when summary.json exists (it is written last). Loading never unpickles objects: every
.pt file is read with torch.load(weights_only=True). A damaged file is one line naming it.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.errors import UserError
from utils.io import read_json
from utils.model_file import load_defense_model, load_model_file
from utils.record_names import FORMAT_VERSION, READABLE_VERSIONS, is_complete, read_record_config, record_path

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
    versions = set()
    for f in ("summary.json", "poison.json"):
        v = read_json(path / f, "record file").get("format_version")
        if v not in READABLE_VERSIONS:
            raise UserError(f"the record at {path} has format version {v} ({f}); this toolkit reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}. Make the record again with this version of the "
                            "toolkit")
        versions.add(v)
    if len(versions) > 1:
        raise UserError(f"the record at {path} mixes format versions {sorted(versions)}; it is damaged: make it again")
    trigger_file = "trigger.safetensors" if versions == {FORMAT_VERSION} else "trigger_pattern.png"
    for f in ("config.yaml", "poison.json", "model.pt", trigger_file):
        if not (path / f).exists():
            raise UserError(f"the attack record at {path} lacks {f}; it is damaged: make it again")
    return path


def record_trigger(path: Path, poison: dict):
    """The trigger of an attack record, rebuilt from trigger.safetensors (format 2) or trigger_pattern.png (format 1)."""
    from utils.io import read_bytes
    from utils.triggers import legacy_trigger, read_pattern_png, trigger_from_record
    if poison.get("format_version") == 1:
        return legacy_trigger(poison["trigger"], read_pattern_png(path / "trigger_pattern.png"))
    file = path / "trigger.safetensors"
    return trigger_from_record(poison["trigger"], read_bytes(file, "record file"), file)


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
    trigger = record_trigger(path, poison)
    try:
        given = lambda key: torch.tensor(poison[key], dtype=torch.int64) if key in poison else None   # noqa: E731
        plan = PoisonPlan(poison["attack_label_trans"], poison["attack_target"], poison["attack_label_shift_amount"],
                          torch.tensor(poison["reserve_indices"], dtype=torch.int64),
                          torch.tensor(poison["poison_indices"], dtype=torch.int64),
                          bool(poison.get("clean_label", False)), int(poison.get("trigger_seed", cfg.get("random_seed", 0))),
                          given("poison_labels"), given("bd_test_indices") if "bd_test_labels" in poison else None,
                          given("bd_test_labels"), cross_indices=given("cross_indices"))
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
