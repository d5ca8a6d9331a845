"""What every defense shares: common options, config layering (command line > --yaml_path >
config/defense/<defense>/<dataset>.yaml), loading the attack record, the defender's clean subset, the
re-evaluation of the attacked model, and the defense record with DER and RIR (conventions §8-§10)."""
import re
from dataclasses import dataclass

import torch

from utils.config import (CONFIG_DIR, Opt, build_parser, cli_values, format_config, in_range, read_yaml, resolve,
                          spec_deviations)
from utils.errors import UserError
from utils.metrics import der, rir
from utils.plots import curves_figure
from utils.poison import defender_clean_subset, read_index_file
from utils.record import check_attack_record, load_attack_record, model_payload, record_dataset
from utils.run_folder import Run, is_complete, record_path
from utils.seeding import fix_random
from utils.train import EvalSets, Precision, device_check, evaluate_backdoor, pick_device

DEFENSE_OPTIONS = [
    Opt("result_file", str, None, "the attack record: a folder name under record/ or a path (required)"),
    Opt("dataset_path", str, None, "folder holding the datasets (default: the attack's)"),
    Opt("device", str, "auto", "auto, cpu, cuda or cuda:<i>", check=device_check),
    Opt("amp", bool, True, "mixed precision where the hardware supports it (bf16 on CPU)"),
    Opt("channels_last", bool, True, "channels_last memory format"),
    Opt("random_seed", int, 0, "seed of every random choice of the defense", check=in_range(0)),
    Opt("eval_batch_size", int, 1024, "evaluation batch size", check=in_range(1)),
]


RUN_KEYS = {o.name for o in DEFENSE_OPTIONS}


def defense_config(defense: str, method_opts: list, argv=None, description="", config_dir=None, spec_for=None,
                   dataset=None):
    """Resolve a defense's settings. The dataset comes from the attack record, which is checked first.
    spec_for(cfg, dataset) -> the spec's per-dataset values; every setting that departs from the spec is put in
    args.deviations (written into config.yaml by open_defense). `dataset`: for checking a command whose attack record
    does not exist yet (a sweep's defense job before its attack has run); a record that exists is used as always."""
    opts = DEFENSE_OPTIONS + method_opts
    args = build_parser(f"defense/{defense}.py", opts, description).parse_args(argv)
    cli = cli_values(args)
    user = read_yaml(args.yaml_path) if args.yaml_path else {}
    result_file = cli.get("result_file") or user.get("result_file")
    if not result_file:
        raise UserError(f"--result_file is required: the attack record to defend, e.g. "
                        f"`python defense/{defense}.py --result_file badnet_demo`")
    if dataset is None or is_complete(record_path(result_file)):
        dataset = record_dataset(check_attack_record(result_file))
    folder = CONFIG_DIR / "defense" / (config_dir or defense)
    file = folder / f"{dataset}.yaml"
    if not file.exists():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise UserError(f"no {defense} settings for dataset {dataset}: {file} is missing (there are: {', '.join(known)}); "
                        "write one or pass --yaml_path")
    layers = [(str(file.relative_to(CONFIG_DIR.parent)), read_yaml(file))]
    if args.yaml_path:
        layers.append((args.yaml_path, user))
    layers.append(("command line", cli))
    cfg = resolve(opts, layers)
    args.dataset = dataset
    args.deviations = spec_deviations(method_opts, cfg, spec_for(cfg, dataset) if spec_for else None, skip=RUN_KEYS)
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


def check_out_name(name: str):
    """A defense writes only into its own folder under <record>/defense/: a plain folder name, never a path."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", name):
        raise UserError(f"output folder name '{name}' is not allowed: use letters, digits, '_', '-', '.', '+' "
                        "(no path separators, no leading '.')")


def open_defense(defense: str, cfg: dict, args, out_name=None, deviations=()) -> DefenseContext:
    """Load the attack record, open record/<attack>/defense/<out_name>/ and re-evaluate the attacked model.
    deviations: what the method itself adds to args.deviations (from defense_config)."""
    check_out_name(out_name or defense)
    fix_random(cfg["random_seed"])
    device = pick_device(cfg["device"])
    precision = Precision(device, cfg["amp"], cfg["channels_last"])
    record = load_attack_record(cfg["result_file"], cfg["dataset_path"], device="cpu")
    if cfg.get("index"):   # the clean-subset file is read before anything is written or moved aside
        read_index_file(cfg["index"], len(record.data.y_train_true))
    run = Run(record.path / "defense" / (out_name or defense), defense, cfg, overwrite=args.overwrite,
              resume=args.resume, deviations=[*getattr(args, "deviations", []), *deviations],
              extra={"attack_record": str(record.path), "attack": record.poison["attack"]})
    try:
        run.update_meta(device=str(device), precision=precision.description)   # what --amp gave on this hardware
        print(f"{defense}: resolved configuration\n{format_config(cfg)}")
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


def finish_defense(ctx: DefenseContext, rows, payload: dict, extra_summary=None, curves_title=""):
    """model.pt, curves.png, and summary.json with the attack's figures, DER and RIR; prints the comparison."""
    run, a = ctx.run, ctx.attack_figures
    last = rows[-1]
    run.save_model(payload)
    run.write_file("curves.png", curves_figure(rows, curves_title or f"{run.method} on {ctx.record.path.name}"))
    d = {"test_acc": last["test_acc"], "test_asr": last["test_asr"], "test_ra": last["test_ra"]}
    summary = {"defense": run.method, "attack": ctx.record.poison["attack"], "attack_record": str(ctx.record.path),
               "dataset": ctx.record.config["dataset"], "model": ctx.record.model_info["model_name"],
               **d, **{k: last[k] for k in last if k.startswith("raw_test_")},
               "attack_test_acc": a["test_acc"], "attack_test_asr": a["test_asr"], "attack_test_ra": a["test_ra"],
               "der": der(a["test_acc"], a["test_asr"], d["test_acc"], d["test_asr"]),
               "rir": rir(a["test_acc"], a["test_ra"], d["test_acc"], d["test_ra"]),
               **(extra_summary or {})}
    summary = run.finish(summary)
    print(f"\n{'':12}{'ACC':>8}{'ASR':>8}{'RA':>8}\n{'attack':12}{a['test_acc']:8.4f}{a['test_asr']:8.4f}{a['test_ra']:8.4f}\n"
          f"{run.method:12}{d['test_acc']:8.4f}{d['test_asr']:8.4f}{d['test_ra']:8.4f}\n"
          f"DER {summary['der']:.4f}  RIR {summary['rir']:.4f}  ({summary['seconds']:.1f}s)\nrecord: {run.path}")
    return summary
