"""What every data-poisoning attack shares: its options, the config layering, building the poisoned sets,
the training recipe of conventions §11, and writing the attack record. An attack file supplies its trigger
(and, for Bypass, its own epoch)."""
import time
from dataclasses import dataclass, field

import torch

from models import MODELS, build_model
from utils.config import CONFIG_DIR, Opt, build_parser, cli_values, format_config, in_range, read_yaml, resolve
from utils.data import DATASETS, dataset_info, load_dataset
from utils.errors import UserError
from utils.io import atomic_write_json
from utils.plots import curves_figure, trigger_figure
from utils.poison import build_poisoned_data, plan_poison
from utils.record import model_payload
from utils.run_folder import FORMAT_VERSION, Run, record_path
from utils.seeding import fix_random, generator
from utils.train import (EvalSets, GeneratorState, Precision, device_check, evaluate_backdoor, fit, make_optimizer,
                         make_scheduler, pick_device, random_crop_flip, scheduler_step, train_epoch_supervised)
from utils.triggers import pattern_png_bytes

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
    Opt("epochs", int, 100, "training epochs", check=in_range(1)),
    Opt("batch_size", int, 128, "training batch size", check=in_range(1)),
    Opt("drop_last", bool, True, "drop the last incomplete batch"),
    Opt("lr", float, 0.01, "initial learning rate", check=in_range(0, lo_open=True)),
    Opt("client_optimizer", str, "sgd", "optimiser", choices=("sgd", "adam")),
    Opt("sgd_momentum", float, 0.9, "SGD momentum", check=in_range(0, 1)),
    Opt("wd", float, 5e-4, "weight decay", check=in_range(0)),
    Opt("lr_scheduler", str, "CosineAnnealingLR", "schedule", choices=("CosineAnnealingLR", "ReduceLROnPlateau", "none")),
    Opt("cos_t_max", int, 100, "T_max of the cosine schedule (BackdoorBench: 100 whatever the epochs)", check=in_range(1)),
    Opt("crop_padding", int, 4, "random-crop padding of the training augmentation (0: no crop)", check=in_range(0)),
    Opt("hflip", bool, None, "random horizontal flip (default: the dataset's rule, on for cifar10 only)"),
    Opt("device", str, "auto", "auto, cpu, cuda or cuda:<i>", check=device_check),
    Opt("amp", bool, True, "mixed precision where the hardware supports it (bf16 on CPU)"),
    Opt("channels_last", bool, True, "channels_last memory format"),
    Opt("random_seed", int, 0, "seed of every random choice", check=in_range(0)),
    Opt("eval_every", int, 1, "evaluate every N epochs (and always after the last)", check=in_range(1)),
    Opt("eval_batch_size", int, 1024, "evaluation batch size", check=in_range(1)),
]


def attack_config(attack: str, method_opts: list, argv=None, description=""):
    """Parse and layer: command line > --yaml_path > config/attack/<attack>/<dataset>.yaml (optional: the method's
    settings chosen for a dataset without published ones) > config/attack/<attack>/default.yaml > prototype/<dataset>.yaml."""
    opts = ATTACK_OPTIONS + method_opts
    args = build_parser(f"attack/{attack}.py", opts, description).parse_args(argv)
    cli = cli_values(args)
    user = read_yaml(args.yaml_path) if args.yaml_path else {}
    default_file = CONFIG_DIR / "attack" / attack / "default.yaml"
    default = read_yaml(default_file) if default_file.exists() else {}
    dataset = cli.get("dataset") or user.get("dataset") or default.get("dataset") or "fashion_mnist"
    dataset_info(str(dataset))  # unknown dataset: the error lists the known ones
    proto_file = CONFIG_DIR / "attack" / "prototype" / f"{dataset}.yaml"
    layers = [(str(proto_file.relative_to(CONFIG_DIR.parent)), read_yaml(proto_file)),
              (str(default_file.relative_to(CONFIG_DIR.parent)), default)]
    dataset_file = CONFIG_DIR / "attack" / attack / f"{dataset}.yaml"
    if dataset_file.exists():
        layers.append((str(dataset_file.relative_to(CONFIG_DIR.parent)), read_yaml(dataset_file)))
    if args.yaml_path:
        layers.append((args.yaml_path, user))
    layers.append(("command line", cli))
    cfg = resolve(opts, layers)
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
    """What an attack's training sees (handed to a custom epoch such as Bypass's)."""
    cfg: dict
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    precision: Precision
    data: object
    x_train: torch.Tensor      # uint8, the attacker's training set, on the device
    y_train: torch.Tensor
    indicator: torch.Tensor
    y_true: torch.Tensor
    shuffle_gen: torch.Generator
    aug_gen: torch.Generator
    augment: object
    eval_sets: EvalSets
    state: dict = field(default_factory=dict)       # extra objects to checkpoint
    payload: dict = field(default_factory=dict)     # extra entries of model.pt


def standard_epoch(ctx: AttackContext):
    """Conventions §11: shuffle, CE on the attack labels, one step per batch, scheduler step at the end."""
    lr = ctx.optimizer.param_groups[0]["lr"]
    stats, order, preds = train_epoch_supervised(ctx.model, ctx.x_train, ctx.y_train, ctx.optimizer, ctx.precision,
                                                 ctx.shuffle_gen, ctx.cfg["batch_size"], ctx.cfg["drop_last"], ctx.augment)
    scheduler_step(ctx.scheduler, stats["train_loss"])
    return {"lr": lr, **stats, **split_train_metrics(ctx, order, preds)}


def split_train_metrics(ctx, order, preds):
    """train_acc_clean_only, train_asr_bd_only, train_ra_bd_only (conventions §9)."""
    ind = ctx.indicator.cpu()[order]
    y, yt = ctx.y_train.cpu()[order], ctx.y_true.cpu()[order]
    clean, bd = ind == 0, ind == 1
    f = lambda m, lab: (preds[m] == lab[m]).float().mean().item() if m.any() else float("nan")
    return {"train_acc_clean_only": f(clean, y), "train_asr_bd_only": f(bd, y), "train_ra_bd_only": f(bd, yt)}


def augmentation_deviations(cfg) -> list:
    """Training augmentation that departs from conventions §4 (crop padding 4 everywhere, flip on cifar10 only)."""
    out = []
    if cfg["crop_padding"] != 4:
        out.append(f"crop_padding = {cfg['crop_padding']} (conventions §4: 4)")
    rule = DATASETS[cfg["dataset"]].hflip
    if cfg["hflip"] is not None and cfg["hflip"] != rule:
        out.append(f"hflip = {cfg['hflip']} (conventions §4: {rule} for {cfg['dataset']})")
    return out


def prepare_data(cfg, trigger):
    """The clean dataset, the poison plan and the poisoned sets, with every check that needs them (sizes, p_num,
    a training set of at least one batch): all before any file is written or an old record is moved aside."""
    dataset = load_dataset(cfg["dataset"], cfg["dataset_path"])
    plan = plan_poison(dataset.y_train, dataset.info.num_classes, cfg["pratio"], cfg["p_num"], cfg["attack_label_trans"],
                       cfg["attack_target"], cfg["attack_label_shift_amount"], cfg["reserve_ratio"],
                       cfg["reserve_rule"], cfg["random_seed"])
    n_train = len(dataset.y_train) - len(plan.reserve_indices)
    if cfg["drop_last"] and n_train < cfg["batch_size"]:
        raise UserError(f"the attacker's training set holds {n_train} samples, fewer than batch_size "
                        f"{cfg['batch_size']}: with drop_last no batch would be trained; lower --batch_size"
                        + (" or --reserve_ratio" if len(plan.reserve_indices) else ""))
    return dataset, plan, build_poisoned_data(dataset, trigger, plan)


def run_attack(attack: str, cfg: dict, args, trigger, trigger_meta: dict, setup_epoch=None, extra_config=None):
    """Poison, train, evaluate every epoch, and write the record. setup_epoch(ctx) -> epoch function, for attacks
    whose training differs from the standard loop (Bypass); it may add to ctx.state and ctx.payload."""
    path = record_path(cfg["save_folder_name"])
    t0 = time.time()
    dataset, plan, data = prepare_data(cfg, trigger)
    device = pick_device(cfg["device"])
    extra = dict(extra_config or {})
    run = Run(path, attack, cfg, overwrite=args.overwrite, resume=args.resume, extra=extra,
              deviations=augmentation_deviations(cfg) + extra.pop("deviations", []))
    try:
        print(f"{attack}: resolved configuration\n{format_config(cfg)}")
        fix_random(cfg["random_seed"])
        precision = Precision(device, cfg["amp"], cfg["channels_last"])
        run.update_meta(device=str(device), precision=precision.description)   # what --amp gave on this hardware
        info = dataset.info
        print(f"data: {info.name}, {len(data.train_indices)} training samples ({len(plan.poison_indices)} poisoned, "
              f"{len(plan.reserve_indices)} reserved), {len(data.y_test)} clean and {len(data.y_bd_test)} poisoned test "
              f"samples; ready in {time.time() - t0:.1f}s; device {device}, {precision.description}")
        write_poison_json(run, attack, cfg, trigger, trigger_meta, plan, data)
        run.write_file("trigger_pattern.png", pattern_png_bytes(trigger.pattern))
        show = plan.poison_indices[:8]
        run.write_file("trigger.png", trigger_figure(data.x_train_clean[show], data.x_train[show], data.y_train_true[show],
                                                     data.y_train[show], f"{attack} on {info.name}"))

        model = precision.prepare_model(build_model(cfg["model"], info.num_classes, info.shape[0], info.mean, info.std,
                                                    cfg["model_width"]))
        optimizer = make_optimizer(model.parameters(), cfg)
        scheduler = make_scheduler(optimizer, cfg)
        tr = data.train_indices
        hflip = info.hflip if cfg["hflip"] is None else cfg["hflip"]
        aug_gen = generator(cfg["random_seed"], "augmentation")
        ctx = AttackContext(
            cfg, model, optimizer, scheduler, precision, data,
            x_train=data.x_train[tr].to(device), y_train=data.y_train[tr].to(device),
            indicator=data.poison_indicator[tr].to(device), y_true=data.y_train_true[tr].to(device),
            shuffle_gen=generator(cfg["random_seed"], "shuffle"), aug_gen=aug_gen,
            augment=lambda x: random_crop_flip(x, aug_gen, cfg["crop_padding"], hflip),
            eval_sets=EvalSets(data, device))
        epoch_fn = setup_epoch(ctx) if setup_epoch else standard_epoch
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "precision": precision,
                 "shuffle_gen": GeneratorState(ctx.shuffle_gen), "aug_gen": GeneratorState(aug_gen), **ctx.state}
        evaluate = lambda: {**evaluate_backdoor(model, ctx.eval_sets, precision, cfg["eval_batch_size"]),
                            **(ctx.payload.get("_evaluate", lambda: {})())}
        rows = fit(run, cfg["epochs"], lambda e: epoch_fn(ctx), evaluate, state, cfg["eval_every"])

        payload = model_payload(model, cfg["model"], info.shape, cfg["model_width"], info.name)
        payload.update({k: v for k, v in ctx.payload.items() if not k.startswith("_")})
        run.save_model(payload)
        run.write_file("curves.png", curves_figure(rows, f"{attack} on {info.name} ({cfg['model']})"))
        last = rows[-1]
        summary = run.finish({"attack": attack, "dataset": info.name, "model": cfg["model"], "pratio": cfg["pratio"],
                              "test_acc": last["test_acc"], "test_asr": last["test_asr"], "test_ra": last["test_ra"],
                              "epochs": cfg["epochs"],
                              "train_seconds": round(sum(r["seconds"] for r in rows), 2)})
        print(f"\n{attack} done in {summary['seconds']:.1f}s: ACC {summary['test_acc']:.4f}  ASR {summary['test_asr']:.4f}"
              f"  RA {summary['test_ra']:.4f}\nrecord: {path}")
        return summary
    finally:
        run.close()


def write_poison_json(run, attack, cfg, trigger, trigger_meta, plan, data):
    atomic_write_json(run.path / "poison.json", {
        "format_version": FORMAT_VERSION, "attack": attack, "dataset": cfg["dataset"],
        "attack_label_trans": plan.label_trans, "attack_target": plan.target,
        "attack_label_shift_amount": plan.shift, "pratio": cfg["pratio"], "n_poison": len(plan.poison_indices),
        "trigger": {**trigger.spec(), **trigger_meta},
        "reserve_ratio": cfg["reserve_ratio"], "reserve_rule": cfg["reserve_rule"],
        "digests": data.digests(),
        "poison_indices": plan.poison_indices.tolist(), "reserve_indices": plan.reserve_indices.tolist(),
        "bd_test_indices": data.bd_test_indices.tolist()})
