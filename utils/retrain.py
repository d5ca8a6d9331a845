"""Training a fresh model on part of the attack's poisoned training set with the attack's own recipe (its model and
width, optimiser, schedule, batch size, augmentation and epochs). This is what the filtering defenses (Activation
Clustering, Spectral Signatures) do with the samples they keep, so that their result differs from the attack's
only by what was removed. The recipe is read from the attack record's config.yaml; a method may override keys
(each override is a deviation it records)."""
import torch

from models import build_model
from utils.engine.augment import random_crop_flip
from utils.engine.epoch import train_epoch_supervised
from utils.engine.loop import GeneratorState, Phase
from utils.engine.optim import make_optimizer, make_scheduler, scheduler_step
from utils.config import Opt
from utils.errors import UserError
from utils.seeding import fix_random, generator

RECIPE_KEYS = ("epochs", "batch_size", "drop_last", "lr", "client_optimizer", "sgd_momentum", "wd", "amsgrad",
               "lr_scheduler", "cos_t_max", "eta_min", "plateau_factor", "plateau_patience", "crop_padding", "hflip",
               "steplr_milestones", "steplr_gamma")
# keys added after records were first written: an older record lacks them, and only a MultiStepLR recipe reads them
LATER_KEYS = {"steplr_milestones": [100, 200, 300, 400], "steplr_gamma": 0.1}


def recipe_override_options():
    """One option per recipe key, default none (the attack's value); an explicit value is a recorded deviation."""
    from utils.options import SCHEDULERS
    kinds = {"epochs": int, "batch_size": int, "drop_last": bool, "lr": float, "sgd_momentum": float, "wd": float,
             "amsgrad": bool, "cos_t_max": int, "eta_min": float, "plateau_factor": float, "plateau_patience": int,
             "crop_padding": int, "hflip": bool, "steplr_gamma": float}
    choices = {"client_optimizer": ("sgd", "adam"), "lr_scheduler": SCHEDULERS}
    from utils.options import milestones
    kinds["steplr_milestones"] = milestones
    return [Opt(k, kinds.get(k, str), None, f"retraining {k.replace('_', ' ')} (default: the attack's)",
                choices=choices.get(k)) for k in RECIPE_KEYS]


def attack_recipe(record, overrides=None) -> dict:
    """The attack's training recipe (RECIPE_KEYS of its config), with `overrides` applied where not None."""
    missing = [k for k in RECIPE_KEYS if k not in record.config and k not in LATER_KEYS]
    if missing:
        raise UserError(f"the attack record at {record.path} lacks the training settings {', '.join(missing)} in "
                        "config.yaml; it is damaged or too old: make it again")
    recipe = {k: record.config.get(k, LATER_KEYS.get(k)) for k in RECIPE_KEYS}
    recipe.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return recipe


def fresh_model(ctx):
    """The attack's architecture with new weights drawn from the defense's seed, prepared for the run's precision."""
    info, cfg = ctx.record.dataset.info, ctx.record.config
    fix_random(ctx.cfg["random_seed"])
    model = build_model(cfg["model"], info.num_classes, info.shape[0], info.mean, info.std, cfg.get("model_width"))
    return ctx.precision.prepare_model(model.to(ctx.device))


def retrain(ctx, keep, recipe: dict, name="retrain", desc="retrain"):
    """A phase training a fresh model on the kept positions of the attacker's training set, and its checkpoint
    state. `keep()` -> a bool mask over data.train_indices; it is called when the phase starts in this process (a
    filter's detection step, run or resumed before it, has decided by then). Returns (phase, state, model); the
    phase's rows carry the training accuracy on the kept poisoned samples (their attack labels)."""
    data, seed = ctx.data, ctx.cfg["random_seed"]
    model = fresh_model(ctx)
    opt = make_optimizer(model.parameters(), recipe)
    sched = make_scheduler(opt, recipe)
    shuffle, aug = GeneratorState(generator(seed, "shuffle")), GeneratorState(generator(seed, "augmentation"))
    hflip = ctx.record.dataset.info.hflip if recipe["hflip"] is None else recipe["hflip"]
    augment = lambda b: random_crop_flip(b, aug.gen, recipe["crop_padding"], hflip)   # noqa: E731
    kept = {}

    def setup():
        tr = data.train_indices[keep().cpu()]
        if len(tr) == 0:
            raise UserError("the detector removed every training sample: nothing is left to retrain on")
        kept.update(x=data.x_train[tr].to(ctx.device), y=data.y_train[tr].to(ctx.device),
                    poisoned=data.poison_indicator[tr].to(ctx.device).bool())

    def train_epoch(epoch):
        x, y, poisoned = kept["x"], kept["y"], kept["poisoned"]
        lr = opt.param_groups[0]["lr"]
        stats, order, preds = train_epoch_supervised(model, x, y, opt, ctx.precision, shuffle.gen,
                                                     recipe["batch_size"], recipe["drop_last"], augment,
                                                     desc=f"{desc} {epoch}")
        scheduler_step(sched, stats["train_loss"])
        bd = poisoned[order]
        return {"lr": lr, **stats, "train_asr_bd_only":
                (preds[bd] == y[order][bd]).float().mean().item() if bool(bd.any()) else float("nan")}
    state = {"model": model, "optimizer": opt, "scheduler": sched, "precision": ctx.precision,
             "shuffle_gen": shuffle, "aug_gen": aug}
    return Phase(name, recipe["epochs"], train_epoch, lambda: ctx.evaluate(model), setup=setup), state, model
