"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018, arXiv 1805.12185; spec: docs/specs/fp.md).

Backdoor neurons tend to lie dormant on clean inputs. Fine-Pruning ranks the channels of the model's last stage by
their mean activation on the defender's clean data and prunes them, least active first, for as long as the clean
accuracy drops by less than a set fraction; then it fine-tunes the pruned model on the same clean data, the pruned
channels held at zero, to undo what pruning left of the backdoor.

    python defense/fp.py --result_file badnet_demo

Project decisions (spec §6): the stopping rule sees only the defender's clean subset (BackdoorBench measures the
test set), exactly k channels at count k, the last accepted count is the one fine-tuned, ranking and search in fp32
on un-augmented images, channels (not pooled positions) pruned through the head's columns.
"""
import json
import math
import time

import torch

from utils.config import Opt, in_range
from utils.defense import check_classes, defense_config, finish_defense, open_defense
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.epoch import train_epoch_supervised
from utils.engine.evaluate import eval_mode
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import make_optimizer, make_scheduler, scheduler_step
from utils.errors import UserError, run_main
from utils.io import read_json
from utils.options import clean_subset_options, recipe_options
from utils.registry import register
from utils.seeding import generator
from utils.stages import Recorder, head_columns

OPTIONS = [
    *clean_subset_options(ratio=0.05, balanced=False),
    Opt("allow_missing_classes", bool, False, "go on when the clean subset lacks a class"),
    Opt("acc_ratio", float, 0.1, "tolerated drop of the clean-subset accuracy while pruning", check=in_range(0, 1)),
    Opt("acc_drop", str, "relative", "the drop measured relative to the unpruned accuracy (BackdoorBench) or absolute",
        choices=("relative", "absolute")),
    Opt("once_prune_ratio", float, 0.01, "pruning step: ceil(C * once_prune_ratio) channels",
        check=in_range(0, 1, lo_open=True)),
    Opt("log_test_during_pruning", bool, True, "also log every candidate's test ACC / ASR / RA (never used to choose)"),
    *recipe_options(epochs=100, batch_size=256, lr=0.01, drop_last=None),   # BackdoorBench's ft-bb recipe
    Opt("crop_padding", int, 4, "random-crop padding of the fine-tuning augmentation (0: no crop)", check=in_range(0)),
    Opt("hflip", bool, None, "random horizontal flip in fine-tuning (default: the dataset's rule, cifar10 only)"),
]


# --- 1. ranking: mean activation of each channel of the last stage -------------------------------------------

@torch.no_grad()
def mean_activations(model, x_uint8, batch_size=512):
    """a_c = mean over the clean images and positions of channel c of the last stage's output, eval mode, fp32."""
    stage = list(model.stages())[-1]
    total, n = None, 0
    with eval_mode(model):
        for i in range(0, len(x_uint8), batch_size):
            with Recorder(model, [stage]) as rec:
                model(to_unit(x_uint8[i:i + batch_size]))
            z = rec[stage].float()
            s = z.sum((0, 2, 3))
            total = s if total is None else total + s
            n += z.shape[0] * z.shape[2] * z.shape[3]
    return stage, (total / n).cpu()


def pruning_order(means: torch.Tensor) -> torch.Tensor:
    """Channels by mean activation ascending, lower index first on ties."""
    return torch.sort(means, stable=True).indices


# --- 2. the search: prune while the clean accuracy holds --------------------------------------------------------

def candidates(channels: int, once_prune_ratio: float) -> list:
    step = math.ceil(channels * once_prune_ratio)
    return list(range(0, channels, step))


def accepted(acc0: float, acc: float, cfg) -> bool:
    """A drop below acc_ratio (relative to acc0, or absolute); an increase is always accepted."""
    if acc0 <= 0:
        raise UserError("the attacked model classifies none of the clean subset correctly; Fine-Pruning has no "
                        "accuracy to keep")
    drop = (acc0 - acc) / acc0 if cfg["acc_drop"] == "relative" else acc0 - acc
    return drop < cfg["acc_ratio"]


@torch.no_grad()
def masked_accuracy(model, feats, labels, cols) -> float:
    """Accuracy of the head on cached features with the pruned columns ignored (the pruned channels' output is 0)."""
    logits = model.head(feats.masked_fill(cols.to(feats.device), 0))
    return (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def features(model, x_uint8, batch_size=1024):
    with eval_mode(model):
        return torch.cat([model.features(to_unit(x_uint8[i:i + batch_size])).float()
                          for i in range(0, len(x_uint8), batch_size)])


def search(ctx, model, order, channels, x, y):
    """Rows of prune_log.csv and k*: the largest count before the first one whose clean-subset accuracy drops too
    much. The test sets are only logged."""
    cfg, sets = ctx.cfg, ctx.eval_sets
    f_sub = features(model, x)
    tests = (features(model, sets.x_test), features(model, sets.x_bd)) if cfg["log_test_during_pruning"] else None
    rows, best, acc0 = [], 0, None
    for k in candidates(channels, cfg["once_prune_ratio"]):
        cols = head_columns(model, channels, order[:k])
        acc = masked_accuracy(model, f_sub, y, cols)
        acc0 = acc if acc0 is None else acc0
        ok = accepted(acc0, acc, cfg)
        row = {"num_pruned": k, "clean_subset_acc": acc, "relative_drop": (acc0 - acc) / acc0, "accepted": int(ok)}
        if tests is not None:
            row.update(test_acc=masked_accuracy(model, tests[0], sets.y_test, cols),
                       test_asr=masked_accuracy(model, tests[1], sets.y_bd, cols),
                       test_ra=masked_accuracy(model, tests[1], sets.y_bd_true, cols))
        rows.append(row)
        if not ok:
            break
        best = k
    return rows, best, acc0


# --- 3. the phases: prune, then fine-tune with the pruned channels held at zero ---------------------------------

def prune_phase(ctx, model, x, y) -> Phase:
    def step(_):
        t0 = time.time()
        stage, means = mean_activations(model, x)
        order = pruning_order(means)
        rows, k, acc0 = search(ctx, model, order, len(means), x, y)
        pruned, acc_k = order[:k].tolist(), next(r["clean_subset_acc"] for r in rows if r["num_pruned"] == k)
        with torch.no_grad():
            model.head.weight[:, head_columns(model, len(means), pruned).to(model.head.weight.device)] = 0
        write_pruning(ctx.run, stage, means, order, rows, pruned, (acc0, acc_k), ctx.cfg, time.time() - t0)
        print(f"{stage}: {len(means)} channels; pruned {k} (clean-subset accuracy {acc0:.4f} -> {acc_k:.4f}; "
              f"acc_ratio {ctx.cfg['acc_ratio']})")
        return {"lr": None, "train_loss": None, "train_acc": None}
    return Phase("prune", 1, step, lambda: ctx.evaluate(model), label="after pruning, epoch", start=0)


def write_pruning(run, stage, means, order, rows, pruned, accs, cfg, seconds):
    """ranking.csv, prune_log.csv and pruned.json; accs: the clean-subset accuracy unpruned and at k*."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    run.write_file("ranking.csv", "channel,mean_activation,rank\n" + "".join(
        f"{c},{means[c].item():.6g},{rank[c].item()}\n" for c in range(len(means))))
    keys = list(rows[0])
    run.write_file("prune_log.csv", ",".join(keys) + "\n" + "".join(
        ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n" for r in rows))
    run.write_file("pruned.json", json.dumps({
        "stage": stage, "channels": len(means), "step": math.ceil(len(means) * cfg["once_prune_ratio"]),
        "k": len(pruned), "pruned_channels": pruned, "clean_subset_acc_unpruned": accs[0],
        "clean_subset_acc_pruned": accs[1],
        "acc_ratio": cfg["acc_ratio"], "acc_drop": cfg["acc_drop"], "seconds": round(seconds, 3)}, indent=1) + "\n")


def finetune_phase(ctx, model, x, y, state) -> Phase:
    cfg, opt, sched = ctx.cfg, state["optimizer"], state["scheduler"]
    hflip = ctx.record.dataset.info.hflip if cfg["hflip"] is None else cfg["hflip"]
    augment = lambda b: random_crop_flip(b, state["aug_gen"].gen, cfg["crop_padding"], hflip)
    keep_zero = []

    def setup():   # the pruned channels, from pruned.json: written by this run or by the one it resumes
        p = read_json(ctx.run.path / "pruned.json", "record file")
        cols = head_columns(model, p["channels"], p["pruned_channels"]).to(model.head.weight.device)

        @torch.no_grad()
        def zero():
            model.head.weight[:, cols] = 0
        keep_zero.append(zero)

    def train_epoch(epoch):
        lr = opt.param_groups[0]["lr"]
        stats, _, _ = train_epoch_supervised(model, x, y, opt, ctx.precision, state["shuffle_gen"].gen,
                                             cfg["batch_size"], False, augment, desc=f"fp fine-tune {epoch}",
                                             after_step=keep_zero[0])
        scheduler_step(sched, stats["train_loss"])
        return {"lr": lr, **stats}
    return Phase("fine-tune", cfg["epochs"], train_epoch, lambda: ctx.evaluate(model), setup=setup)


@register("fp", "defense", paper="Liu et al., RAID 2018", needs=("trained_model", "clean_subset"), options=OPTIONS,
          summary="Fine-Pruning: prune the last stage's least active channels while clean accuracy holds, fine-tune")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    return defense_config("fp", OPTIONS, argv, __doc__, dataset=dataset)


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("fp", cfg, args)
    try:
        x, y, _ = ctx.clean_subset(cfg["ratio"], cfg["balanced"], cfg["index"])
        check_classes(y, ctx.data.num_classes, cfg["allow_missing_classes"])
        model = ctx.attacked_model()
        opt = make_optimizer(model.parameters(), cfg)
        state = {"model": model, "optimizer": opt, "scheduler": make_scheduler(opt, cfg), "precision": ctx.precision,
                 "shuffle_gen": GeneratorState(generator(cfg["random_seed"], "shuffle")),
                 "aug_gen": GeneratorState(generator(cfg["random_seed"], "augmentation"))}
        rows = fit(ctx.run, [prune_phase(ctx, model, x, y), finetune_phase(ctx, model, x, y, state)], state)
        p = read_json(ctx.run.path / "pruned.json", "record file")
        return finish_defense(ctx, rows, ctx.plain_payload(model), {
            "stage": p["stage"], "n_pruned": p["k"], "n_channels": p["channels"],
            "clean_subset_acc_unpruned": p["clean_subset_acc_unpruned"],
            "clean_subset_acc_pruned": p["clean_subset_acc_pruned"], "pruned_test_acc": rows[0]["test_acc"],
            "pruned_test_asr": rows[0]["test_asr"], "pruned_test_ra": rows[0]["test_ra"],
            "prune_seconds": p["seconds"], "epochs": cfg["epochs"]})
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
