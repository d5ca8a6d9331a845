"""ANP's neurons and pruning (docs/specs/anp.md §5.1, §5.5, §8), shared by defense/anp.py and defense/rnp.py:
every affine BN channel is a neuron with a mask in [0, 1]; the final masks rank the neurons, and the lowest are
pruned (BN scale set to 0) in the attacked model by a fixed amount or by the clean-subset accuracy, never by the
test sets, whose figures along the grid are logged only."""
import copy
import io
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import Opt, in_range
from utils.engine.evaluate import predict
from utils.engine.loop import Phase
from utils.errors import UserError
from utils.metrics import accuracy
from utils.plots import score_histogram


# --- options shared by both methods ------------------------------------------------------------------------

def pruning_options(pruning_number):
    """Pruning and selection (anp.md §5.5): ANP and RNP differ only in the fixed amount."""
    return [
        Opt("pruning_by", str, "threshold", "prune the masks <= a threshold, or a number of the lowest",
            choices=("threshold", "number")),
        Opt("pruning_number", float, pruning_number, "the fixed amount: a threshold, or a count with pruning_by "
            "number", check=in_range(0)),
        Opt("selection", str, "fixed", "fixed: prune pruning_number; clean_acc: the largest grid point whose "
            "clean-subset accuracy drops by less than acc_ratio (never the test sets)", choices=("fixed", "clean_acc")),
        Opt("acc_ratio", float, 0.1, "tolerated relative drop of the clean-subset accuracy (clean_acc)",
            check=in_range(0, 1)),
        Opt("pruning_max", float, 0.9, "end of the logged grid and of the clean_acc search", check=in_range(0)),
        Opt("pruning_step", float, 0.05, "step of that grid", check=in_range(0, lo_open=True)),
        Opt("log_test_during_pruning", bool, True, "log every grid point's test ACC / ASR / RA (never used to choose)"),
    ]


def augment_options():
    return [Opt("crop_padding", int, 4, "random-crop padding of the subset batches (0: no crop)", check=in_range(0)),
            Opt("hflip", bool, None, "random horizontal flip (default: the dataset's rule, cifar10 only)")]


# --- 1. the neurons: every affine BN channel, with a mask (and ANP's perturbations) ------------------------------

class MaskedBN(nn.Module):
    """A BN layer whose output is gamma (m + delta) x_hat + beta (1 + xi) when perturbed, gamma m x_hat + beta
    otherwise. It holds the BN's own tensors under their own names, so its state dict is the BN's plus the masks."""

    def __init__(self, bn, noise=True):
        super().__init__()
        self.momentum, self.eps, self.track_running_stats = bn.momentum, bn.eps, bn.track_running_stats
        self.weight, self.bias = bn.weight, bn.bias
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(k, getattr(bn, k))
        c = bn.num_features
        self.mask = nn.Parameter(torch.ones(c, device=bn.weight.device))
        self.noise_w = nn.Parameter(torch.zeros(c, device=bn.weight.device)) if noise else None
        self.noise_b = nn.Parameter(torch.zeros(c, device=bn.weight.device)) if noise else None
        self.perturbed = False

    def forward(self, x):
        if self.perturbed:
            w, b = self.weight * (self.mask + self.noise_w), self.bias * (1 + self.noise_b)
        else:
            w, b = self.weight * self.mask, self.bias
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)    # as nn.BatchNorm does
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else momentum
        stats = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if stats else None, self.running_var if stats else None, w, b,
                            self.training or self.running_mean is None, momentum, self.eps)


def bn_layers(model) -> list:
    """(name, module) of every affine BN, in named_modules() order: neuron j runs over these, channels ascending."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine]
    if not found:
        raise UserError(f"{type(model).__name__} has no affine BatchNorm layer, and its channels are the neurons this "
                        "defense masks and prunes; use a model with BN (cnn, preactresnet18, resnet18, vgg19_bn)")
    return found


def neuron_table(model) -> list:
    return [(name, c) for name, bn in bn_layers(model) for c in range(bn.num_features)]


def masked_copy(model, noise=True):
    """A copy of the model, every original parameter frozen, each BN replaced by a MaskedBN (masks at 1)."""
    w = copy.deepcopy(model).requires_grad_(False)
    for name, bn in bn_layers(w):
        parent, _, child = name.rpartition(".")
        setattr(w.get_submodule(parent), child, MaskedBN(bn, noise))
    return w


def masked_layers(w) -> list:
    return [m for m in w.modules() if isinstance(m, MaskedBN)]


def set_perturbed(layers, on: bool):
    for layer in layers:
        layer.perturbed = on


def mask_vector(layers) -> torch.Tensor:
    return torch.cat([layer.mask.detach().float().cpu() for layer in layers])


# --- 2. pruning and selection (anp.md §5.5) -----------------------------------------------------------------------

def pruning_order(masks) -> torch.Tensor:
    """Ascending masks, lower neuron index first on ties."""
    return torch.sort(masks, stable=True).indices


def prune_set(masks, by, amount) -> list:
    """The neurons to prune, in pruning order: masks <= the threshold (compared in fp32), or exactly `amount`."""
    order = pruning_order(masks)
    if by == "threshold":
        return order[masks[order] <= torch.tensor(amount, dtype=masks.dtype)].tolist()
    return order[:int(amount)].tolist()


def prune_grid(by, step, maximum) -> list:
    """Thresholds round(i * step, 12) <= maximum, or the counts 0, step, 2 step, ... <= maximum."""
    if by == "number":
        return list(range(0, int(maximum) + 1, int(step)))
    out, i = [], 0
    while round(i * step, 12) <= maximum:
        out.append(round(i * step, 12))
        i += 1
    return out


def select_clean_acc(accs, acc_ratio) -> int:
    """Index of the last grid point before the first whose relative drop from accs[0] reaches acc_ratio."""
    if accs[0] <= 0:
        raise UserError("the grid's first model classifies none of the clean subset correctly; selection clean_acc "
                        "has no accuracy to keep: use --selection fixed")
    best = 0
    for i, a in enumerate(accs):
        if (accs[0] - a) / accs[0] >= acc_ratio:
            break
        best = i
    return best


def check_pruning(cfg, n_neurons):
    """The amounts fit the neurons; counts are integers (anp.md §7 item 14)."""
    if cfg["pruning_by"] == "number":
        for k in ("pruning_number", "pruning_max", "pruning_step"):
            if not float(cfg[k]).is_integer():
                raise UserError(f"{k} = {cfg[k]} is not a count; pruning_by number needs integers, e.g. "
                                "--pruning_number 100 --pruning_max 1000 --pruning_step 20")
        if cfg["pruning_number"] > n_neurons - 1:
            raise UserError(f"pruning_number {int(cfg['pruning_number'])} leaves no neuron of {n_neurons}; "
                            f"use at most {n_neurons - 1}")
    elif cfg["pruning_number"] > 1:
        raise UserError(f"pruning_number {cfg['pruning_number']} is a threshold on masks in [0, 1]: use at most 1, "
                        "or --pruning_by number for a count")


@torch.no_grad()
def apply_pruning(model, table, neurons, original=None):
    """gamma_j <- 0 for the given neurons (the other neurons' gamma from `original`, if given); nothing else."""
    mods = dict(model.named_modules())
    for name, gamma in (original or {}).items():
        mods[name].weight.copy_(gamma)
    for j in neurons:
        name, c = table[j]
        mods[name].weight[c] = 0


def sweep(ctx, model, masks, x, y):
    """Rows of prune_log.csv over the grid (the clean-subset accuracy, and the test figures when logged) and the
    index of the clean_acc choice (None for fixed). Every candidate is built from the attacked model."""
    cfg, table = ctx.cfg, neuron_table(model)
    work = copy.deepcopy(model)
    original = {n: bn.weight.detach().clone() for n, bn in bn_layers(model)}
    key = cfg["pruning_by"] if cfg["pruning_by"] == "number" else "threshold"
    rows = []
    for amount in [a for a in prune_grid(cfg["pruning_by"], cfg["pruning_step"], cfg["pruning_max"])
                   if key == "threshold" or a <= len(table) - 1]:
        s = prune_set(masks, cfg["pruning_by"], amount)
        apply_pruning(work, table, s, original)
        row = {key: amount, "n_pruned": len(s), "clean_subset_acc": subset_accuracy(ctx, work, x, y)}
        if cfg["log_test_during_pruning"]:
            f = ctx.evaluate(work)
            row.update(test_acc=f["test_acc"], test_asr=f["test_asr"], test_ra=f["test_ra"])
        rows.append(row)
    a0 = rows[0]["clean_subset_acc"]
    chosen = select_clean_acc([r["clean_subset_acc"] for r in rows], cfg["acc_ratio"]) \
        if cfg["selection"] == "clean_acc" else None
    for i, r in enumerate(rows):
        r["relative_drop"] = (a0 - r["clean_subset_acc"]) / a0 if a0 > 0 else None
        r["accepted"] = "" if chosen is None or i > chosen + 1 else int(i <= chosen)
    return rows, chosen


def subset_accuracy(ctx, model, x, y) -> float:
    return accuracy(predict(model, x, ctx.precision, ctx.cfg["eval_batch_size"])[0], y)


def backdoorbench_choice(rows, attack, acc_ratio):
    """Analysis only (anp.md §7 item 1): BackdoorBench's test-selected point, lowest test ASR among those whose test
    ACC moved by less than acc_ratio relative to the attacked model's; None: the unpruned model."""
    best, asr = None, attack["test_asr"]
    for r in rows:
        if abs(r["test_acc"] - attack["test_acc"]) / attack["test_acc"] < acc_ratio and r["test_asr"] < asr:
            best, asr = r, r["test_asr"]
    return {"analysis_only": True, **(best or {"unpruned": True})}


def prune_phase(ctx, model, masks_of, x, y) -> Phase:
    """Prune `model` (the attacked model) by the final masks; pruned.json, masks.csv, prune_log.csv, plots."""
    def step(_):
        t0, cfg, table = time.time(), ctx.cfg, neuron_table(model)
        masks = masks_of()
        rows, chosen = sweep(ctx, model, masks, x, y)
        key = "number" if cfg["pruning_by"] == "number" else "threshold"
        amount = cfg["pruning_number"] if chosen is None else rows[chosen][key]
        amount = int(amount) if key == "number" else amount
        acc0 = subset_accuracy(ctx, model, x, y)
        s = prune_set(masks, cfg["pruning_by"], amount)
        apply_pruning(model, table, s)
        info = {"selection": cfg["selection"], "pruning_by": cfg["pruning_by"], key: amount,
                "n_neurons": len(table), "n_pruned": len(s), "pruned_fraction": len(s) / len(table),
                "clean_subset_acc_unpruned": acc0, "clean_subset_acc_pruned": subset_accuracy(ctx, model, x, y),
                **({"acc_ratio": cfg["acc_ratio"]} if chosen is not None else {}),
                "prune_seconds": round(time.time() - t0, 3),
                **({"analysis_test_selected": backdoorbench_choice(rows, ctx.attack_figures, cfg["acc_ratio"])}
                   if cfg["log_test_during_pruning"] else {}),
                "neurons": s, "pruned": [[*table[j], masks[j].item()] for j in s]}
        write_pruning(ctx.run, table, masks, s, rows, key, amount, info)
        print(f"{len(table)} neurons; pruned {len(s)} ({cfg['selection']}, {key} {amount}; clean-subset accuracy "
              f"{acc0:.4f} -> {info['clean_subset_acc_pruned']:.4f})")
        return {"lr": None, "train_loss": None, "train_acc": None}
    return Phase("prune", 1, step, lambda: ctx.evaluate(model), label="after pruning, epoch", start=0)


def write_pruning(run, table, masks, s, rows, key, amount, info):
    rank = torch.empty(len(masks), dtype=torch.long)
    rank[pruning_order(masks)] = torch.arange(len(masks))
    pruned = set(s)
    run.write_file("masks.csv", "neuron,module,channel,mask,rank,pruned\n" + "".join(
        f"{j},{n},{c},{masks[j].item():.9g},{rank[j].item()},{int(j in pruned)}\n" for j, (n, c) in enumerate(table)))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)   # noqa: E731
    run.write_file("prune_log.csv", ",".join(cols) + "\n" + "".join(
        ",".join(fmt(r.get(k)) for k in cols) + "\n" for r in rows))
    run.write_file("pruned.json", json.dumps(info, indent=1) + "\n")
    run.write_file("mask_hist.png", score_histogram({"masks": masks}, threshold=amount if key == "threshold" else None,
                                                    title=f"{run.method}: final masks", xlabel="mask"))
    run.write_file("prune_curve.png", prune_curve(rows, key, amount, f"{run.method}: pruning sweep"))


def prune_curve(rows, key, amount, title) -> bytes:
    import matplotlib.pyplot as plt   # utils.plots has set the Agg backend
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [r[key] for r in rows]
    for k, label in (("clean_subset_acc", "clean-subset ACC"), ("test_acc", "test ACC"), ("test_asr", "ASR"),
                     ("test_ra", "RA")):
        if k in rows[0]:
            ax.plot(xs, [r[k] for r in rows], marker="o", ms=3, label=label)
    ax.axvline(amount, color="k", ls="--", label=f"chosen {amount:g}")
    ax.set(xlabel=key, ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def check_subset(ctx, y):
    """Missing classes are a warning (the objective needs none); the counts go to config.yaml."""
    counts = torch.bincount(y.cpu(), minlength=ctx.data.num_classes).tolist()
    ctx.run.update_meta(clean_subset_class_counts=counts)
    missing = [c for c, n in enumerate(counts) if n == 0]
    if missing:
        print(f"warning: the clean subset has no sample of class(es) {missing}; the defense goes on")
    if ctx.run.meta.get("clean_subset", {}).get("source") == "unpoisoned":
        print("note: the attacker trained on the clean subset (no reserve), so accuracies on it are training "
              "accuracies; make the attack with --reserve_ratio for held-out defender data")


def one_axis(rows) -> list:
    """The rows numbered 1, 2, ... across the phases, for curves.png (each phase's own epochs restart)."""
    return [{**r, "epoch": i} for i, r in enumerate(rows, 1)]
