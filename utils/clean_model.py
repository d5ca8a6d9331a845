"""The clean-model resource (kind `clean_model`): the attack's architecture trained on the whole clean training split
with the dataset's prototype recipe (conventions §11), no poisoning, seeds from resource_seed. LF searches its
pattern on it, TrojanNN picks its neurons and optimises its trigger on it; one model serves every attack that asks
for the same dataset, model, width, recipe and seed.

The recipe is the prototype's (config/attack/prototype/<dataset>.yaml over the recipe defaults), not the attack's
own command line: an attack run with --epochs 3 still finds the clean model every other run made. The folder is a
training run of the toolkit (config.yaml, log.txt, metrics.csv, curves.png, model.pt) and resumes from its
checkpoint with --resume, like an attack.
"""
from dataclasses import dataclass

import torch

from models import build_model
from utils.attack import ATTACK_OPTIONS, data_hflip
from utils.config import CONFIG_DIR, read_yaml
from utils.engine.augment import random_crop_flip
from utils.engine.device import pick_device
from utils.engine.epoch import train_epoch_supervised
from utils.engine.evaluate import predict
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import make_optimizer, make_scheduler, scheduler_step
from utils.engine.setup import start_engine
from utils.model_file import load_model_file, model_payload
from utils.options import recipe_options
from utils.plots import curves_figure
from utils.resources import data_identity, obtain, resource_root, resource_seed
from utils.run_folder import Run
from utils.seeding import fix_random, generator

RECIPE_KEYS = tuple(o.name for o in recipe_options()) + ("crop_padding", "hflip")
ENGINE_KEYS = ("device", "amp", "channels_last", "compile", "deterministic", "checkpoint_every", "eval_batch_size")


def clean_recipe(cfg) -> dict:
    """The clean model's settings: the prototype's recipe for the dataset, the attack's model, width and engine."""
    defaults = {o.name: o.default for o in ATTACK_OPTIONS}
    proto_file = CONFIG_DIR / "attack" / "prototype" / f"{cfg['dataset']}.yaml"
    proto = read_yaml(proto_file) if proto_file.exists() else {}
    recipe = {k: proto.get(k, defaults[k]) for k in RECIPE_KEYS}
    return {"dataset": cfg["dataset"], "dataset_path": cfg["dataset_path"], "model": cfg["model"],
            "model_width": cfg["model_width"], **recipe, **{k: cfg[k] for k in ENGINE_KEYS},
            "random_seed": resource_seed(cfg)}


def clean_identity(rc: dict, dataset) -> dict:
    return {"kind": "clean_model", **data_identity(dataset), "model": rc["model"], "model_width": rc["model_width"],
            "recipe": {k: rc[k] for k in RECIPE_KEYS}, "seed": rc["random_seed"]}


@dataclass
class Training:
    """A fresh model of the recipe on the device, with its optimiser, schedule, generators and the split's tensors:
    what the clean and the robust model's training share."""
    model: torch.nn.Module
    device: torch.device
    precision: object
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    optimizer: object
    scheduler: object
    shuffle_gen: torch.Generator
    aug_gen: torch.Generator
    hflip: bool


def start_training(run, rc: dict, dataset) -> Training:
    info, seed = dataset.info, rc["random_seed"]
    fix_random(seed)   # the initial weights
    model = build_model(rc["model"], info.num_classes, info.shape[0], info.mean, info.std, rc["model_width"])
    device = pick_device(rc["device"])
    precision = start_engine(run, rc, device, model, f"{rc['model']} width {rc['model_width']}", info.shape,
                             rc["batch_size"])
    model = precision.prepare_model(model)
    optimizer = make_optimizer(model.parameters(), rc)
    return Training(model, device, precision, dataset.x_train.to(device), dataset.y_train.to(device),
                    dataset.x_test.to(device), dataset.y_test.to(device), optimizer, make_scheduler(optimizer, rc),
                    generator(seed, "shuffle"), generator(seed, "augmentation"), data_hflip(rc))


def train_clean_model(folder, rc: dict, dataset, resume: bool) -> dict:
    """Standard supervised training on the clean split into `folder` (a Run); returns the entries of resource.json."""
    run = Run(folder, "clean_model", rc, resume=resume)
    try:
        info = dataset.info
        t = start_training(run, rc, dataset)
        model, device, precision, x, y, x_test, y_test, optimizer, scheduler, shuffle_gen, aug_gen, hflip = (
            t.model, t.device, t.precision, t.x, t.y, t.x_test, t.y_test, t.optimizer, t.scheduler, t.shuffle_gen,
            t.aug_gen, t.hflip)

        def epoch(e):
            lr = optimizer.param_groups[0]["lr"]
            stats, _, _ = train_epoch_supervised(model, x, y, optimizer, precision, shuffle_gen, rc["batch_size"],
                                                 rc["drop_last"], lambda b: random_crop_flip(b, aug_gen, rc["crop_padding"], hflip),
                                                 desc=f"clean model {e}")
            scheduler_step(scheduler, stats["train_loss"])
            return {"lr": lr, **stats}

        def evaluate():
            pred, _ = predict(model, x_test, precision, rc["eval_batch_size"])
            return {"test_acc": (pred == y_test).float().mean().item()}

        rows = fit(run, Phase("train", rc["epochs"], epoch, evaluate), {
            "model": model, "optimizer": optimizer, "scheduler": scheduler, "precision": precision,
            "shuffle_gen": GeneratorState(shuffle_gen), "aug_gen": GeneratorState(aug_gen)})
        run.save_model(model_payload(model, rc["model"], info.shape, rc["model_width"], info.name))
        run.write_file("curves.png", curves_figure(rows, f"clean model on {info.name} ({rc['model']})",
                                                   series=(("test_acc", "ACC"),)))
        summary = run.finish({"method": "clean_model", "dataset": info.name, "model": rc["model"],
                              "test_acc": rows[-1]["test_acc"], "epochs": rc["epochs"]})
        return {"test_acc": summary["test_acc"], "train_seconds": summary["seconds"], "device": str(device),
                "precision": precision.description}
    finally:
        run.close()


def clean_model(cfg, dataset, resume=False):
    """(the model in eval mode on the CPU, its Resource): found, or built with the engine's epoch bars."""
    rc = clean_recipe(cfg)
    name = f"clean_model_{rc['dataset']}_{rc['model']}_s{rc['random_seed']}"
    res = obtain(resource_root(cfg), name, clean_identity(rc, dataset),
                 lambda folder, resumed: train_clean_model(folder, rc, dataset, resumed),
                 rebuild=cfg.get("resource_rebuild", False), resume=resume, resumable=True)
    print(f"clean model {res.name}: test accuracy {res.meta['test_acc']:.4f}")
    model, _ = load_model_file(res.path / "model.pt")
    return model.eval(), res
