"""FT-SAM, fine-tuning with sharpness-aware minimisation (Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023, arXiv 2304.11823; spec: docs/specs/ftsam.md).

Plain fine-tuning on a little clean data barely moves the neurons that carry a backdoor, which tend to have large
weight norms. FT-SAM fine-tunes with adaptive SAM instead: every step first moves the weights to the worst point of
a neighbourhood scaled by each weight's magnitude, e = rho (w * w * g) / || |w| * g ||, and applies the gradient
taken there at the original weights. The perturbation hits large-norm neurons hardest, so minimising the loss at
the perturbed point shrinks them and the backdoor is forgotten, while the clean loss keeps the accuracy.

    python defense/ftsam.py --result_file badnet_demo

Project decisions (spec §7): the yamls' per-dataset rho and label smoothing are the defaults (BackdoorBench's
argparse overrides them, so it runs rho 2 and smoothing 0.1 everywhere); the cosine schedule steps once per
iteration with T_max 100, periodic as in the original (`sched_step epoch` offered); ReduceLROnPlateau steps once per
epoch on the mean training loss (the original's call lacks the metric and fails); the weights are restored from a
copy after the perturbed pass, not by subtracting e; the loss is the original's KL with s / (K - 1) off-target mass.
"""
import contextlib

import torch

from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.epoch import batch_indices, progress, weighted_sum
from utils.engine.evaluate import predict
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import make_optimizer, make_scheduler, scheduler_step
from utils.errors import UserError, run_main
from utils.options import clean_subset_options, recipe_options
from utils.registry import register
from utils.seeding import generator

OPTIONS = [
    *clean_subset_options(ratio=0.05, balanced=True),
    *recipe_options(epochs=100, batch_size=256, lr=0.01, drop_last=None),   # the base optimiser and its schedule
    Opt("sched_step", str, "iteration", "when the lr schedule steps: every iteration (the original: a periodic "
        "cosine with T_max 100 iterations) or every epoch", choices=("iteration", "epoch")),
    Opt("rho_max", float, 2.0, "SAM radius at the initial lr", check=in_range(0)),
    Opt("rho_min", float, 2.0, "SAM radius at lr 0 (rho follows lr / lr_0 between the two)", check=in_range(0)),
    Opt("adaptive", bool, True, "adaptive SAM: the radius scaled by |w| (false: plain SAM)"),
    Opt("label_smoothing", float, 0.1, "1 - s on the true class, s / (K - 1) on each other one (0: plain CE)",
        check=in_range(0, 1, hi_open=True)),
    Opt("alpha", float, 0.0, "weight of the gradient decomposition (0: off)", check=in_range(0)),
    Opt("perturb_eps", float, 1e-12, "added to every norm it divides by", check=in_range(0, lo_open=True)),
    Opt("crop_padding", int, 4, "random-crop padding of the fine-tuning augmentation (0: no crop)", check=in_range(0)),
    Opt("hflip", bool, None, "random horizontal flip (default: the dataset's rule, cifar10 only)"),
]


# --- 1. the loss -------------------------------------------------------------------------------------------------

def smoothed_kl(logits, y, s: float):
    """mean_i KL(q_i || softmax(z_i)), q = 1 - s on y and s / (K - 1) elsewhere, 0 log 0 = 0, in fp32. Its gradient is
    that of the smoothed cross-entropy; s = 0 gives the plain cross-entropy."""
    logp = logits.float().log_softmax(1)
    q = torch.full_like(logp, s / (logp.shape[1] - 1)).scatter_(1, y[:, None], 1.0 - s)
    return (torch.xlogy(q, q) - q * logp).sum(1).mean()


# --- 2. the radius -----------------------------------------------------------------------------------------------

def rho_at(lr: float, lr0: float, rho_max: float, rho_min: float) -> float:
    """rho_t = rho_min + (rho_max - rho_min) lr_t / lr_0 (the original's proportion scheduler, min lr 0)."""
    return rho_max if rho_max == rho_min else rho_min + (rho_max - rho_min) * lr / lr0


# --- 3. the perturbation and the decomposition -------------------------------------------------------------------

def joint_norm(tensors):
    return torch.stack([t.norm() for t in tensors]).norm()


@torch.no_grad()
def sam_perturbation(weights, grads, rho, adaptive: bool, eps: float):
    """e = rho (w * w * g) / (|| |w| * g || + eps) (adaptive) or rho g / (||g|| + eps), one norm over every
    parameter jointly. Returns (e, the norm divided by)."""
    n = joint_norm([w.abs() * g for w, g in zip(weights, grads)] if adaptive else grads)
    scale = rho / (n + eps)
    return [g * scale * (w * w if adaptive else 1.0) for w, g in zip(weights, grads)], n


@torch.no_grad()
def decompose(g, g2, alpha: float, eps: float):
    """g' - alpha (g - c ||g|| g' / (||g'|| + eps)), c = <g, g'> / (||g'|| ||g|| + eps): alpha times the part of
    the first gradient orthogonal to the perturbed one subtracted. alpha 0: g' itself."""
    if alpha == 0:
        return g2
    n, n2 = joint_norm(g), joint_norm(g2)
    c = sum((a * b).sum() for a, b in zip(g, g2)) / (n2 * n + eps)
    return [b - alpha * (a - c * n * b / (n2 + eps)) for a, b in zip(g, g2)]


@contextlib.contextmanager
def bn_statistics_kept(model):
    """BatchNorm momentum 0 inside: normalisation still uses the batch, the running statistics stay as they are."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] if model else []
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, v in zip(bns, saved):
            m.momentum = v


# --- 4. one FT-SAM iteration ---------------------------------------------------------------------------------------

def sam_iteration(params, loss_fn, optimizer, rho, cfg, model=None):
    """Gradient g at w; w' = w + e; gradient g' at w' on the same batch (BN statistics kept); w restored from its
    copy; the base optimiser steps at w with g' (decomposed when alpha > 0). loss_fn() -> (loss, outputs).
    Returns (L(w), L(w'), outputs at w, the norm of g, the norm of e)."""
    optimizer.zero_grad(set_to_none=True)
    loss, out = loss_fn()
    loss.backward()
    live = [p for p in params if p.grad is not None]
    g = [p.grad.detach().clone() for p in live]
    e, _ = sam_perturbation([p.detach() for p in live], g, rho, cfg["adaptive"], cfg["perturb_eps"])
    saved = [p.detach().clone() for p in live]
    with torch.no_grad():
        for p, ei in zip(live, e):
            p.add_(ei)
    optimizer.zero_grad(set_to_none=True)
    with bn_statistics_kept(model):
        loss2, _ = loss_fn()
        loss2.backward()
    g2 = decompose(g, [p.grad for p in live], cfg["alpha"], cfg["perturb_eps"])
    with torch.no_grad():
        for p, w, gi in zip(live, saved, g2):
            p.copy_(w)
            p.grad = gi
    optimizer.step()
    return loss.detach(), loss2.detach(), out, joint_norm(g), joint_norm(e)


# --- 5. the schedule and the epoch ---------------------------------------------------------------------------------

def check_schedule(cfg):
    if cfg["lr_scheduler"] == "ReduceLROnPlateau" and cfg["sched_step"] == "iteration":
        raise UserError("ReduceLROnPlateau watches the epoch's mean training loss and steps once per epoch: pass "
                        "--sched_step epoch (or choose --lr_scheduler CosineAnnealingLR)")


class Counter:
    """The iteration count t, kept in the checkpoint."""

    def __init__(self):
        self.t = 0

    def state_dict(self):
        return {"t": self.t}

    def load_state_dict(self, d):
        self.t = int(d["t"])


def ftsam_epoch(model, x, y, optimizer, scheduler, cfg, precision, shuffle_gen, augment, counter):
    """One pass over the clean subset in train mode, one FT-SAM iteration per batch (last batch kept); the scheduler
    steps after every iteration or once at the end. Figures summed on the device, read back once."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr0 = cfg["lr"]
    # an fp16 gradient scaler cannot serve two backward passes per step: those cards run FT-SAM in fp32
    autocast = precision.autocast if precision.scaler is None else contextlib.nullcontext
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    sums = {k: zero for k in ("train_loss", "train_loss_sam", "train_acc", "grad_norm", "perturb_norm")}
    lr_first, rho_first, seen, batches = optimizer.param_groups[0]["lr"], None, 0, 0
    for idx in progress(batch_indices(len(y), cfg["batch_size"], shuffle_gen, device=x.device), "ft-sam"):
        xb, yb = precision.prepare_input(augment(to_unit(x[idx]))), y[idx]

        def loss_fn():
            with autocast():
                logits = model(xb)
            return smoothed_kl(logits, yb, cfg["label_smoothing"]), logits.detach()
        lr_last = optimizer.param_groups[0]["lr"]
        rho = rho_at(lr_last, lr0, cfg["rho_max"], cfg["rho_min"])
        rho_first = rho if rho_first is None else rho_first
        l1, l2, out, gn, en = sam_iteration(params, loss_fn, optimizer, rho, cfg, model)
        n = len(idx)
        for k, v in (("train_loss", l1), ("train_loss_sam", l2), ("train_acc", (out.argmax(1) == yb).float().mean()),
                     ("grad_norm", gn), ("perturb_norm", en)):
            sums[k] = weighted_sum(sums[k], v, n)
        seen, batches, counter.t = seen + n, batches + 1, counter.t + 1
        if cfg["sched_step"] == "iteration":
            scheduler_step(scheduler)
    out = dict(zip(sums, (v / seen for v in torch.stack(list(sums.values())).tolist())))
    if cfg["sched_step"] == "epoch":
        scheduler_step(scheduler, out["train_loss"])
    with torch.no_grad():
        w_norm = joint_norm([p.float() for p in params]).item()
    return {"lr": lr_first, "lr_last": lr_last, "rho": rho_first,
            **out, "weight_norm": w_norm}


# --- 6. the neurons' norms -------------------------------------------------------------------------------------------

def neuron_norms(model):
    """{(module, channel): L2 norm} of every output channel of each Conv2d of the last stage and each head row."""
    stage = list(model.stages().values())[-1]
    names = {id(m): n for n, m in model.named_modules()}
    mods = [m for m in stage.modules() if isinstance(m, torch.nn.Conv2d)] + [model.head]
    return {(names[id(m)], c): v for m in mods for c, v in enumerate(m.weight.detach().float().flatten(1).norm(dim=1)
                                                                       .tolist())}


def write_neuron_norms(run, before, after):
    run.write_file("neuron_norms.csv", "module,channel,norm_before,norm_after\n" + "".join(
        f"{m},{c},{before[(m, c)]:.6g},{after[(m, c)]:.6g}\n" for m, c in before))
    conv = [(after[k] - before[k]) / before[k] for k in before if k[0] != "head" and before[k] > 0]
    return sum(conv) / len(conv) if conv else None


# --- main -----------------------------------------------------------------------------------------------------

# The spec's per-dataset values (ftsam.md §3; the options' defaults are the cifar10 and cifar100 row)
SPEC_BY_DATASET = {
    "gtsrb": {"epochs": 50, "rho_max": 8.0, "rho_min": 8.0, "label_smoothing": 0.0},
    "tiny": {"lr_scheduler": "ReduceLROnPlateau", "sched_step": "epoch", "rho_max": 8.0, "rho_min": 8.0,
             "label_smoothing": 0.0},
    "mnist": {"crop_padding": 1}, "fashion_mnist": {"crop_padding": 1},   # the 28x28 recipes' padding
}


@register("ft-sam", "defense", paper="Zhu et al., ICCV 2023", needs=("trained_model", "clean_subset"), options=OPTIONS,
          summary="FT-SAM: fine-tuning with adaptive sharpness-aware minimisation, shrinking large-norm neurons")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("ft-sam", OPTIONS, argv, __doc__, dataset=dataset,
                               spec_for=lambda cfg, d: SPEC_BY_DATASET.get(d, {}))
    check_schedule(cfg)
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("ft-sam", cfg, args)
    try:
        x, y, _ = ctx.clean_subset(cfg["ratio"], cfg["balanced"], cfg["index"])
        model = ctx.attacked_model()
        before = neuron_norms(ctx.record.model)   # from the record: the same on a fresh start and on --resume
        optimizer = make_optimizer(model.parameters(), cfg)
        scheduler = make_scheduler(optimizer, cfg)
        shuffle_gen = GeneratorState(generator(cfg["random_seed"], "shuffle"))
        aug_gen = GeneratorState(generator(cfg["random_seed"], "augmentation"))
        hflip = ctx.record.dataset.info.hflip if cfg["hflip"] is None else cfg["hflip"]
        augment = lambda b: random_crop_flip(b, aug_gen.gen, cfg["crop_padding"], hflip)   # noqa: E731
        counter, sets = Counter(), ctx.eval_sets

        def evaluate():
            m = ctx.evaluate(model)
            _, m["ra_test_loss"] = predict(model, sets.x_bd, ctx.precision, cfg["eval_batch_size"], sets.y_bd_true)
            return m

        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "precision": ctx.precision,
                 "shuffle_gen": shuffle_gen, "aug_gen": aug_gen, "iterations": counter}
        rows = fit(ctx.run, Phase("fine-tune", cfg["epochs"], lambda e: ftsam_epoch(
            model, x, y, optimizer, scheduler, cfg, ctx.precision, shuffle_gen.gen, augment, counter), evaluate,
            show=("rho", "perturb_norm")), state)
        rel = write_neuron_norms(ctx.run, before, neuron_norms(model))
        return finish_defense(ctx, rows, ctx.plain_payload(model.eval()), {
            "epochs": cfg["epochs"], "iterations": counter.t, "clean_subset_size": len(y), "rho_max": cfg["rho_max"],
            "rho_min": cfg["rho_min"], "adaptive": cfg["adaptive"], "sched_step": cfg["sched_step"],
            "label_smoothing": cfg["label_smoothing"], "last_stage_rel_norm_change": rel,
            "weight_norm_last": rows[-1]["weight_norm"]})
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
