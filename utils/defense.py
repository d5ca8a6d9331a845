"""What every defense shares: common options, config layering (command line > --yaml_path >
config/defense/<defense>/<dataset>.yaml > config/defense/<defense>/default.yaml), loading the attack record, the defender's clean subset, the
re-evaluation of the attacked model, and the defense record with DER and RIR (conventions §8-§10)."""
import re
from dataclasses import dataclass

import torch

from utils.config import CONFIG_DIR, Opt, format_config, in_range, layered_config, read_yaml, spec_deviations
from utils.errors import UserError
from utils.metrics import der, rir
from utils.plots import curves_figure
from utils.poison import defender_clean_subset, read_index_file
from utils.model_file import model_payload
from utils.record import check_attack_record, load_attack_record, record_dataset
from utils.record_names import is_complete, record_path
from utils.run_folder import Run
from utils.engine.device import Precision, pick_device
from utils.seeding import fix_random
from utils.engine.setup import start_engine
from utils.engine.evaluate import EvalSets, breakdown_line, breakdown_summary, evaluate_backdoor
from utils.options import device_options

DEFENSE_OPTIONS = [
    Opt("result_file", str, None, "the attack record: a folder name under record/ or a path (required)"),
    Opt("dataset_path", str, None, "folder holding the datasets (default: the attack's)"),
    *device_options(),
    Opt("random_seed", int, 0, "seed of every random choice of the defense", check=in_range(0)),
    Opt("out_suffix", str, "", "appended to the output folder's name (a sweep's defense seeds: _ds1, _ds2, ...)"),
]


RUN_KEYS = {o.name for o in DEFENSE_OPTIONS}


class DefenseLayers:
    """config/defense/<folder>/default.yaml < config/defense/<folder>/<dataset>.yaml, both optional; the dataset is
    the attack record's (or, to check a command whose record does not exist yet, `given_dataset`). Called by
    layered_config; keeps the dataset it found."""

    def __init__(self, folder: str, defense: str, given_dataset=None):
        self.folder, self.defense, self.dataset = folder, defense, given_dataset

    def __call__(self, cli, user):
        result_file = cli.get("result_file") or user.get("result_file")
        if not result_file:
            raise UserError(f"--result_file is required: the attack record to defend, e.g. "
                            f"`python defense/{self.defense}.py --result_file badnet_demo`")
        if self.dataset is None or is_complete(record_path(result_file)):
            self.dataset = record_dataset(check_attack_record(result_file))
        files = [CONFIG_DIR / "defense" / self.folder / name for name in ("default.yaml", f"{self.dataset}.yaml")]
        return [(str(f.relative_to(CONFIG_DIR.parent)), read_yaml(f)) for f in files if f.exists()]


def defense_config(defense: str, method_opts: list, argv=None, description="", config_dir=None, spec_for=None,
                   dataset=None, fixed=None):
    """Resolve a defense's settings: command line > --yaml_path > its files (defense_layers). The dataset comes
    from the attack record, which is checked first. spec_for(cfg, dataset) -> the spec's per-dataset values; every
    setting that departs from the spec is put in args.deviations (written into config.yaml by open_defense).
    `dataset`: for checking a command whose attack record does not exist yet (a sweep's defense job before its
    attack has run); a record that exists is used as always. fixed: options an entry point pins."""
    opts = DEFENSE_OPTIONS + method_opts
    layers = DefenseLayers(config_dir or defense, defense, dataset)
    cfg, args = layered_config(f"defense/{defense}.py", opts, description, argv, layers, fixed)
    args.dataset = layers.dataset
    args.deviations = spec_deviations(method_opts, cfg, spec_for(cfg, layers.dataset) if spec_for else None,
                                      skip=RUN_KEYS)
    return cfg, args


@dataclass
class DefenseContext:
    cfg: dict
    record: object            # utils.record.AttackRecord
    run: Run
    device: torch.device
    precision: Precision
    eval_sets: EvalSets
    attack_figures: dict      # the attacked model re-evaluated with the same evaluator

    @property
    def data(self):
        return self.record.data

    def evaluate(self, model, transform=None, prefix=""):
        return evaluate_backdoor(model, self.eval_sets, self.precision, self.cfg["eval_batch_size"], transform, prefix)

    def clean_subset(self, ratio, balanced=True, index_file=None):
        """The defender's clean data (conventions §8): (x uint8, y) on the device; index.txt saved."""
        idx, source = defender_clean_subset(self.data, ratio, balanced, self.cfg["random_seed"], index_file)
        self.run.write_file("index.txt", "".join(f"{i}\n" for i in idx.tolist()))
        self.run.update_meta(clean_subset={"source": source, "size": len(idx), "ratio": ratio, "balanced": balanced,
                                           "seed": self.cfg["random_seed"]})
        counts = torch.bincount(self.data.y_train_true[idx], minlength=self.data.num_classes).tolist()
        print(f"clean subset: {len(idx)} samples from the {source} pool, per class {counts}")
        return self.data.x_train_clean[idx].to(self.device), self.data.y_train_true[idx].to(self.device), idx

    def attacked_model(self):
        """A fresh copy of the attacked model on the device."""
        import copy
        return self.precision.prepare_model(copy.deepcopy(self.record.model))

    def plain_payload(self, model):
        info = self.record.model_info
        return model_payload(model, info["model_name"], info["input_shape"], info["width"], info["dataset"])


def check_classes(y, k, allow):
    """A clean subset without some class is refused unless the method allows it."""
    counts = torch.bincount(y.cpu(), minlength=k)
    missing = [c for c in range(k) if counts[c] == 0]
    if missing and not allow:
        raise UserError(f"the clean subset has no sample of class(es) {missing}; make the attack with --reserve_ratio, "
                        "give an index file, or pass --allow_missing_classes true")


def check_out_name(name: str):
    """A defense writes only into its own folder under <record>/defense/: a plain folder name, never a path."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", name):
        raise UserError(f"output folder name '{name}' is not allowed: use letters, digits, '_', '-', '.', '+' "
                        "(no path separators, no leading '.')")


def open_defense(defense: str, cfg: dict, args, out_name=None, deviations=()) -> DefenseContext:
    """Load the attack record, open record/<attack>/defense/<out_name>/ and re-evaluate the attacked model.
    deviations: what the method itself adds to args.deviations (from defense_config)."""
    folder = (out_name or defense) + cfg.get("out_suffix", "")
    check_out_name(folder)
    fix_random(cfg["random_seed"])
    device = pick_device(cfg["device"])
    record = load_attack_record(cfg["result_file"], cfg["dataset_path"], device="cpu")
    if cfg.get("index"):   # the clean-subset file is read before anything is written or moved aside
        read_index_file(cfg["index"], len(record.data.y_train_true))
    run = Run(record.path / "defense" / folder, defense, cfg, overwrite=args.overwrite,
              resume=args.resume, deviations=[*getattr(args, "deviations", []), *deviations],
              extra={"attack_record": str(record.path), "attack": record.poison["attack"]})
    try:
        print(f"{defense}: resolved configuration\n{format_config(cfg)}")
        info = record.model_info
        precision = start_engine(run, cfg, device, record.model, f"{info['model_name']} width {info['width']}",
                                 info["input_shape"], cfg.get("batch_size") or record.config.get("batch_size", 128))
        print(f"attack record {record.path}: {record.poison['attack']} on {record.config['dataset']} / "
              f"{record.model_info['model_name']}; device {device}, {precision.description}")
        sets = EvalSets(record.data, device)
        ctx = DefenseContext(cfg, record, run, device, precision, sets, {})
        ctx.attack_figures = ctx.evaluate(precision.prepare_model(record.model))
    except BaseException:
        run.close()   # the caller's try/finally starts after this function returns
        raise
    a = ctx.attack_figures
    print(f"attacked model: ACC {a['test_acc']:.4f}  ASR {a['test_asr']:.4f}  RA {a['test_ra']:.4f}")
    return ctx


def finish_defense(ctx: DefenseContext, rows, payload: dict, extra_summary=None, curves_title="", curves=(),
                   carry=()):
    """model.pt, curves.png, and summary.json with the attack's figures, DER and RIR; prints the comparison.
    curves: (key, label) series added to curves.png; carry: keys of the last row copied into summary.json.
    payload None: a detector that leaves the model as it is (STRIP); no model.pt, no curves, and summary.json says
    model_unchanged."""
    run, a = ctx.run, ctx.attack_figures
    last = rows[-1]
    if payload is not None:
        run.save_model(payload)
        run.write_file("curves.png", curves_figure(rows, curves_title or f"{run.method} on {ctx.record.path.name}",
                                                   dashed=curves))
    d = {"test_acc": last["test_acc"], "test_asr": last["test_asr"], "test_ra": last["test_ra"]}
    summary = {"defense": run.method, "attack": ctx.record.poison["attack"], "attack_record": str(ctx.record.path),
               "dataset": ctx.record.config["dataset"], "model": ctx.record.model_info["model_name"],
               **d, **breakdown_summary(last), **{k: last[k] for k in carry if k in last},
               "attack_test_acc": a["test_acc"], "attack_test_asr": a["test_asr"], "attack_test_ra": a["test_ra"],
               "attack_test_other": a["test_other"], "attack_test_top_wrong_class": a["test_top_wrong_class"],
               "der": der(a["test_acc"], a["test_asr"], d["test_acc"], d["test_asr"]),
               "rir": rir(a["test_acc"], a["test_ra"], d["test_acc"], d["test_ra"]),
               **({"model_unchanged": True} if payload is None else {}), **(extra_summary or {})}
    summary = run.finish(summary)
    print(f"\n{'':12}{'ACC':>8}{'ASR':>8}{'RA':>8}  where the other poisoned predictions go\n"
          f"{'attack':12}{a['test_acc']:8.4f}{a['test_asr']:8.4f}{a['test_ra']:8.4f}  {breakdown_line(a)}\n"
          f"{run.method:12}{d['test_acc']:8.4f}{d['test_asr']:8.4f}{d['test_ra']:8.4f}  {breakdown_line(last)}\n"
          f"DER {summary['der']:.4f}  RIR {summary['rir']:.4f}  ({summary['seconds']:.1f}s)\nrecord: {run.path}")
    return summary
