"""What every data-poisoning attack shares: its options, the config layering, building the poisoned sets, the
training recipe of conventions §11, and writing the attack record. An attack file supplies its trigger and, when
its training is not the standard epoch (Bypass), a Training of its own."""
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from models import MODELS, build_model
from utils.config import CONFIG_DIR, Opt, format_config, in_range, layered_config, read_yaml
from utils.data import DATASETS, dataset_info, load_dataset
from utils.engine.augment import random_crop_flip
from utils.engine.device import Precision, pick_device
from utils.engine.epoch import train_epoch_supervised
from utils.engine.evaluate import EvalSets, breakdown_line, breakdown_summary, cross_accuracy, evaluate_backdoor
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.setup import start_engine
from utils.engine.optim import make_optimizer, make_scheduler, scheduler_step
from utils.errors import UserError
from utils.io import atomic_write_json
from utils.options import device_options, recipe_options
from utils.plots import curves_figure, trigger_figure
from utils.poison import build_poisoned_data, plan_poison
from utils.model_file import model_payload
from utils.record_names import FORMAT_VERSION, record_path
from utils.run_folder import Run
from utils.seeding import fix_random, generator
from utils.triggers import pattern_png_bytes, trigger_file_bytes

ATTACK_OPTIONS = [
    Opt("save_folder_name", str, None, "record folder under record/ (default: <attack>_<dataset>_<model>_<pratio>_<seed>)"),
    Opt("dataset", str, "fashion_mnist", "dataset", choices=tuple(DATASETS)),
    Opt("dataset_path", str, "data", "folder holding the datasets"),
    Opt("model", str, "cnn", "architecture", choices=tuple(MODELS)),
    Opt("model_width", int, None, "base width of the model (default: the model's own)", check=in_range(1)),
    Opt("pratio", float, 0.1, "fraction of the attacker's training set poisoned", check=in_range(0, 1, lo_open=True)),
    Opt("p_num", int, None, "absolute number of poisoned samples (overrides pratio)", check=in_range(1)),
    Opt("attack_label_trans", str, "all2one", "label mode", choices=("all2one", "all2all")),
    Opt("attack_target", int, 0, "target class of all2one", check=in_range(0)),
    Opt("attack_label_shift_amount", int, 1, "all2all label shift s: y -> (y + s) mod K", check=in_range(1)),
    Opt("reserve_ratio", float, 0.0, "class-balanced clean reserve held out for the defender", check=in_range(0, 1, hi_open=True)),
    Opt("reserve_rule", str, "random", "how the reserve is drawn per class", choices=("random", "first")),
    *recipe_options(),
    Opt("crop_padding", int, 4, "random-crop padding of the training augmentation (0: no crop)", check=in_range(0)),
    Opt("hflip", bool, None, "random horizontal flip (default: the dataset's rule, on for cifar10 only)"),
    *device_options(),
    Opt("random_seed", int, 0, "seed of every random choice", check=in_range(0)),
    Opt("eval_every", int, 1, "evaluate every N epochs (and always after the last)", check=in_range(1)),
]


def attack_layers(attack: str):
    """config/attack/prototype/<dataset>.yaml < config/attack/<attack>/default.yaml < config/attack/<attack>/<dataset>.yaml
    (optional: the method's settings chosen for a dataset without published ones)."""
    def layers(cli, user):
        default_file = CONFIG_DIR / "attack" / attack / "default.yaml"
        default = read_yaml(default_file) if default_file.exists() else {}
        dataset = str(cli.get("dataset") or user.get("dataset") or default.get("dataset") or "fashion_mnist")
        dataset_info(dataset)  # unknown dataset: the error lists the known ones
        files = [CONFIG_DIR / "attack" / "prototype" / f"{dataset}.yaml", default_file,
                 CONFIG_DIR / "attack" / attack / f"{dataset}.yaml"]
        return [(str(f.relative_to(CONFIG_DIR.parent)), default if f == default_file else read_yaml(f))
                for f in files if f.exists()]
    return layers


def attack_config(attack: str, method_opts: list, argv=None, description="", fixed=None):
    """Parse and layer: command line > --yaml_path > the attack's files (attack_layers); check what depends on the
    dataset. fixed: options an entry point pins (badnet_bypass.py: trigger badnet)."""
    opts = ATTACK_OPTIONS + method_opts
    cfg, args = layered_config(f"attack/{attack}.py", opts, description, argv, attack_layers(attack), fixed)
    k = DATASETS[cfg["dataset"]].num_classes
    if cfg["attack_target"] >= k:
        raise UserError(f"attack_target = {cfg['attack_target']} is out of range; {cfg['dataset']} has {k} classes, "
                        f"allowed: 0..{k - 1}")
    if cfg["attack_label_trans"] == "all2all" and cfg["attack_label_shift_amount"] % k == 0:
        raise UserError(f"attack_label_shift_amount = {cfg['attack_label_shift_amount']} maps every label to itself; "
                        f"allowed: not a multiple of {k}")
    if cfg["save_folder_name"] is None:
        cfg["save_folder_name"] = f"{attack}_{cfg['dataset']}_{cfg['model']}_{cfg['pratio']}_{cfg['random_seed']}"
    record_path(cfg["save_folder_name"])   # a name that is refused is refused before anything runs
    return cfg, args


@dataclass
class AttackContext:
    """What an attack's training sees."""
    cfg: dict
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    precision: Precision
    data: object
    x_train: torch.Tensor      # uint8, the attacker's training set, on the device
    x_clean: torch.Tensor      # uint8, its clean originals (what per-batch attacks poison as they go)
    y_train: torch.Tensor
    indicator: torch.Tensor
    y_true: torch.Tensor
    shuffle_gen: torch.Generator
    aug_gen: torch.Generator
    augment: object
    eval_sets: EvalSets


@dataclass
class Training:
    """How an attack trains when it is not the standard epoch. Everything optional:
    epoch(ctx, epoch) -> the epoch's row (replaces the standard epoch); batch(ctx, idx) -> (x float, y) builds each
    training batch of the standard epoch from the indices; epoch_start(ctx, epoch) runs before each epoch;
    evaluate() -> extra test metrics for every row; before_eval() runs before each evaluation (a trigger that is
    still learning refreshes the poisoned test set); state: extra objects for the checkpoint; payload() -> extra
    entries of model.pt; show: metric keys of the epoch line; curves: (key, label) series added to curves.png;
    phases_before: Phases run before the classifier's (Input-Aware's mask generator), which then trains `epochs`
    epochs (default: the configured ones) numbered from `start`; final_trigger() -> the trigger as training left
    it, when it learns: the record's poisoned sets are rebuilt from it and the result is evaluated on them."""
    epoch: Optional[Callable] = None
    batch: Optional[Callable] = None
    epoch_start: Optional[Callable] = None
    evaluate: Optional[Callable] = None
    before_eval: Optional[Callable] = None
    state: dict = field(default_factory=dict)
    payload: Optional[Callable] = None
    show: tuple = ()
    curves: tuple = ()
    phases_before: tuple = ()
    epochs: Optional[int] = None
    start: int = 1
    final_trigger: Optional[Callable] = None


def standard_epoch(ctx: AttackContext, batch=None):
    """Conventions §11: shuffle, CE on the attack labels, one step per batch, scheduler step at the end."""
    lr = ctx.optimizer.param_groups[0]["lr"]
    make = (lambda idx: batch(ctx, idx)) if batch is not None else None
    stats, order, preds = train_epoch_supervised(ctx.model, ctx.x_train, ctx.y_train, ctx.optimizer, ctx.precision,
                                                 ctx.shuffle_gen, ctx.cfg["batch_size"], ctx.cfg["drop_last"], ctx.augment,
                                                 make_batch=make)
    scheduler_step(ctx.scheduler, stats["train_loss"])
    return {"lr": lr, **stats, **split_train_metrics(ctx, order, preds)}


def split_train_metrics(ctx, order, preds):
    """train_acc_clean_only, train_asr_bd_only, train_ra_bd_only (conventions §9): counts on the device, one
    read-back; each a float32 count / n, as a float32 mean is (nan where a kind is absent)."""
    ind, y, yt = ctx.indicator[order], ctx.y_train[order], ctx.y_true[order]
    clean, bd = ind == 0, ind == 1
    hits = torch.stack([(clean & (preds == y)).sum(), (bd & (preds == y)).sum(), (bd & (preds == yt)).sum()]).float()
    n = torch.stack([clean.sum(), bd.sum(), bd.sum()]).float()
    acc, asr, ra = (hits / n).tolist()
    return {"train_acc_clean_only": acc, "train_asr_bd_only": asr, "train_ra_bd_only": ra}


def augmentation_deviations(cfg) -> list:
    """Training augmentation that departs from conventions §4 (crop padding 4 everywhere, flip on cifar10 only)."""
    out = []
    if cfg["crop_padding"] != 4:
        out.append(f"crop_padding = {cfg['crop_padding']} (conventions §4: 4)")
    rule = DATASETS[cfg["dataset"]].hflip
    if cfg["hflip"] is not None and cfg["hflip"] != rule:
        out.append(f"hflip = {cfg['hflip']} (conventions §4: {rule} for {cfg['dataset']})")
    return out


def prepare_data(cfg, trigger, clean_label=False, plan=None):
    """The clean dataset, the poison plan and the poisoned sets, with every check that needs them (sizes, p_num,
    a training set of at least one batch): all before any file is written or an old record is moved aside.
    plan(y_train, num_classes) -> PoisonPlan replaces the standard plan (per-batch attacks)."""
    dataset = load_dataset(cfg["dataset"], cfg["dataset_path"])
    if plan is not None:
        plan = plan(dataset.y_train, dataset.info.num_classes)
    else:
        plan = plan_poison(dataset.y_train, dataset.info.num_classes, cfg["pratio"], cfg["p_num"],
                           cfg["attack_label_trans"], cfg["attack_target"], cfg["attack_label_shift_amount"],
                           cfg["reserve_ratio"], cfg["reserve_rule"], cfg["random_seed"], clean_label)
    n_train = len(dataset.y_train) - len(plan.reserve_indices)
    if cfg["drop_last"] and n_train < cfg["batch_size"]:
        raise UserError(f"the attacker's training set holds {n_train} samples, fewer than batch_size "
                        f"{cfg['batch_size']}: with drop_last no batch would be trained; lower --batch_size"
                        + (" or --reserve_ratio" if len(plan.reserve_indices) else ""))
    return dataset, plan, build_poisoned_data(dataset, trigger, plan)


def attack_context(cfg, model, precision, data, device):
    tr = data.train_indices
    hflip = data_hflip(cfg)
    aug_gen = generator(cfg["random_seed"], "augmentation")
    optimizer = make_optimizer(model.parameters(), cfg)
    return AttackContext(
        cfg, model, optimizer, make_scheduler(optimizer, cfg), precision, data,
        x_train=data.x_train[tr].to(device), x_clean=data.x_train_clean[tr].to(device), y_train=data.y_train[tr].to(device),
        indicator=data.poison_indicator[tr].to(device), y_true=data.y_train_true[tr].to(device),
        shuffle_gen=generator(cfg["random_seed"], "shuffle"), aug_gen=aug_gen,
        augment=lambda x: random_crop_flip(x, aug_gen, cfg["crop_padding"], hflip),
        eval_sets=EvalSets(data, device))


def data_hflip(cfg):
    return DATASETS[cfg["dataset"]].hflip if cfg["hflip"] is None else cfg["hflip"]


def run_attack(attack: str, cfg: dict, args, trigger, trigger_meta: dict, training=None, extra_config=None,
               clean_label=False, plan=None, files=None, notes=(), summary=None):
    """Poison, train, evaluate every epoch, and write the record. training(ctx) -> Training, for attacks whose
    training differs from the standard epoch; clean_label: poison target-class samples only, labels kept;
    plan: see prepare_data; files: {name: bytes or text} written into the record with the trigger (figures of
    how the trigger was made); notes: lines printed once the record's log is open (how its resources were made);
    summary: extra entries of summary.json (the attack's own figures)."""
    path = record_path(cfg["save_folder_name"])
    t0 = time.time()
    dataset, plan, data = prepare_data(cfg, trigger, clean_label, plan)
    device = pick_device(cfg["device"])
    extra = dict(extra_config or {})
    run = Run(path, attack, cfg, overwrite=args.overwrite, resume=args.resume, extra=extra,
              deviations=augmentation_deviations(cfg) + extra.pop("deviations", []))
    try:
        print(f"{attack}: resolved configuration\n{format_config(cfg)}")
        for line in notes:
            print(line)
        info = dataset.info
        fix_random(cfg["random_seed"])   # the initial weights
        model = build_model(cfg["model"], info.num_classes, info.shape[0], info.mean, info.std, cfg["model_width"])
        precision = start_engine(run, cfg, device, model, f"{cfg['model']} width {cfg['model_width']}", info.shape,
                                 cfg["batch_size"])
        model = precision.prepare_model(model)
        print(f"data: {info.name}, {len(data.train_indices)} training samples ({len(plan.poison_indices)} poisoned, "
              f"{len(plan.reserve_indices)} reserved), {len(data.y_test)} clean and {len(data.y_bd_test)} poisoned test "
              f"samples; ready in {time.time() - t0:.1f}s; device {device}, {precision.description}")
        write_trigger(run, attack, cfg, trigger, trigger_meta, plan, data)
        for name, content in (files or {}).items():
            run.write_file(name, content)
        ctx = attack_context(cfg, model, precision, data, device)
        t = training(ctx) if training else Training()
        rows = fit(run, [*t.phases_before, attack_phase(ctx, t)], {
            "model": model, "optimizer": ctx.optimizer, "scheduler": ctx.scheduler, "precision": precision,
            "shuffle_gen": GeneratorState(ctx.shuffle_gen), "aug_gen": GeneratorState(ctx.aug_gen), **t.state})
        final = None
        if t.final_trigger is not None:   # the learnt trigger: the record's sets rebuilt from it, the result on them
            trigger = t.final_trigger()
            data = build_poisoned_data(dataset, trigger, plan)
            write_trigger(run, attack, cfg, trigger, trigger_meta, plan, data)
            ctx.data, ctx.eval_sets = data, EvalSets(data, device)
            final = evaluate_attack(ctx, t, refresh=False)
        return finish_attack(run, attack, cfg, info, model, rows, t, final, summary or {})
    finally:
        run.close()


def evaluate_attack(ctx, t: Training, refresh=True) -> dict:
    """C-ACC, ASR, RA and the breakdown; the cross-sample accuracy where the trigger has a cross transform; the
    attack's own figures."""
    if refresh and t.before_eval is not None:
        t.before_eval()
    out = evaluate_backdoor(ctx.model, ctx.eval_sets, ctx.precision, ctx.cfg["eval_batch_size"])
    if ctx.eval_sets.x_cross is not None:
        out.update(cross_accuracy(ctx.model, ctx.eval_sets, ctx.precision, ctx.cfg["eval_batch_size"]))
    return {**out, **(t.evaluate() if t.evaluate is not None else {})}


def attack_phase(ctx, t: Training) -> Phase:
    cfg = ctx.cfg

    def epoch(e):
        if t.epoch_start is not None:
            t.epoch_start(ctx, e)
        return t.epoch(ctx, e) if t.epoch is not None else standard_epoch(ctx, t.batch)

    show = (*t.show, *(("test_cross_acc",) if ctx.eval_sets.x_cross is not None else ()))
    return Phase("train", t.epochs or cfg["epochs"], epoch, lambda: evaluate_attack(ctx, t), start=t.start,
                 eval_every=cfg["eval_every"], show=show)


def finish_attack(run, attack, cfg, info, model, rows, t: Training, final=None, own=None):
    payload = model_payload(model, cfg["model"], info.shape, cfg["model_width"], info.name)
    payload.update(t.payload() if t.payload is not None else {})
    run.save_model(payload)
    run.write_file("curves.png", curves_figure(rows, f"{attack} on {info.name} ({cfg['model']})", dashed=t.curves))
    last = rows[-1] if final is None else final
    extra = {"test_cross_acc": last["test_cross_acc"]} if "test_cross_acc" in last else {}
    if final is not None:   # the last epoch's figures on the sets the trigger made while it was still on the device
        extra.update({f"{k}_during_training": rows[-1].get(k) for k in ("test_acc", "test_asr", "test_ra")})
    summary = run.finish({"attack": attack, "dataset": info.name, "model": cfg["model"], "pratio": cfg["pratio"],
                          "test_acc": last["test_acc"], "test_asr": last["test_asr"], "test_ra": last["test_ra"],
                          **extra, **breakdown_summary(last), **(own or {}),
                          "epochs": cfg["epochs"], "train_seconds": round(sum(r["seconds"] for r in rows), 2)})
    print(f"\n{attack} done in {summary['seconds']:.1f}s: ACC {summary['test_acc']:.4f}  ASR {summary['test_asr']:.4f}"
          f"  RA {summary['test_ra']:.4f}  {breakdown_line(last)}\nrecord: {run.path}")
    return summary


def clean_label_check(plan, data) -> dict:
    """A clean-label attack poisons target-class samples: how many clean ones the defenders' unpoisoned pool keeps
    (none when the whole class is poisoned, and then a class-balanced clean subset cannot be drawn)."""
    tr = data.train_indices
    in_class = int((data.y_train_true[tr] == plan.target).sum())
    left = in_class - len(plan.poison_indices)
    if left < 0.1 * in_class:
        print(f"warning: only {left} of the {in_class} target-class training samples stay clean: defenses drawing "
              "from the unpoisoned pool will see (almost) no clean image of the target class; make the attack with "
              "--reserve_ratio, or give the defense an index file")
    return {"target_class_size": in_class, "target_class_unpoisoned": left}


def write_trigger(run, attack, cfg, trigger, trigger_meta, plan, data):
    """trigger.safetensors (the trigger's tensors), poison.json (its spec and the digests of what it made),
    trigger.png (clean vs poisoned examples) and, for a static pattern, trigger_pattern.png to look at."""
    tensors = trigger_file_bytes(trigger)
    run.write_file("trigger.safetensors", tensors)
    spec = {**trigger.spec(), **trigger_meta, "tensors_file": "trigger.safetensors",
            "tensors_sha256": hashlib.sha256(tensors).hexdigest()}
    extra = clean_label_check(plan, data) if plan.clean_label else {}
    if plan.cross_indices is not None:
        extra["cross_indices"] = plan.cross_indices.tolist()
    if plan.per_batch is not None:
        extra["per_batch"] = plan.per_batch
    atomic_write_json(run.path / "poison.json", {
        "format_version": FORMAT_VERSION, "attack": attack, "dataset": cfg["dataset"],
        "attack_label_trans": plan.label_trans, "attack_target": plan.target,
        "attack_label_shift_amount": plan.shift, "clean_label": plan.clean_label, "trigger_seed": plan.seed,
        "pratio": cfg["pratio"], "n_poison": len(plan.poison_indices), "trigger": spec,
        "reserve_ratio": cfg["reserve_ratio"], "reserve_rule": cfg["reserve_rule"],
        "digests": data.digests(),
        "poison_indices": plan.poison_indices.tolist(), "reserve_indices": plan.reserve_indices.tolist(),
        "bd_test_indices": data.bd_test_indices.tolist(), **extra})
    pattern = getattr(trigger, "pattern", None)
    if isinstance(pattern, torch.Tensor) and pattern.dtype == torch.uint8:
        run.write_file("trigger_pattern.png", pattern_png_bytes(pattern))
    show = plan.poison_indices[:8]
    run.write_file("trigger.png", trigger_figure(data.x_train_clean[show], data.x_train[show], data.y_train_true[show],
                                                 data.y_train[show], f"{attack} on {cfg['dataset']}"))
