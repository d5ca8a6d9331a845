"""Adversarial Neuron Pruning (Wu, Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021,
arXiv 2110.14430; spec: docs/specs/anp.md).

A backdoored network collapses under small adversarial perturbations of its neurons (BN channels). ANP gives every
neuron a mask in [0, 1], keeps every weight frozen, and on a few clean images solves a min-max problem: the inner
step finds the worst multiplicative perturbation within +-eps, the outer step lowers the masks so that the network
stays accurate with and without it. The neurons whose masks fall lowest are then pruned (BN scale set to 0) in the
attacked model; nothing is fine-tuned.

    python defense/anp.py --result_file badnet_demo

Project decisions (spec §7): the pruning amount is fixed (threshold 0.2, the authors' recipe) or chosen on the
defender's clean subset (`selection clean_acc`), never on the test sets (the test sweep is logged only); exactly
k neurons at count k; the mask lr is the paper's 0.2; full-precision masks; exactly nb_iter iterations.
The neurons and the pruning live in defense/anp_pruning.py, shared with RNP.
"""
import math

import torch
import torch.nn.functional as F

from defense.anp_pruning import (apply_pruning, augment_options, check_pruning, check_subset, masked_copy,
                                 masked_layers, mask_vector, neuron_table, one_axis, prune_phase, pruning_options,
                                 set_perturbed)
from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.device import to_device
from utils.engine.epoch import weighted_sum
from utils.engine.loop import GeneratorState, Phase, fit
from utils.errors import run_main
from utils.io import read_json
from utils.options import clean_subset_options
from utils.registry import register
from utils.seeding import generator


OPTIONS = [
    *clean_subset_options(ratio=0.05),
    Opt("batch_size", int, 256, "batch of the mask optimisation", check=in_range(1)),
    Opt("nb_iter", int, 2000, "mask iterations in all", check=in_range(1)),
    Opt("print_every", int, 500, "iterations per logged chunk (one engine epoch)", check=in_range(1)),
    Opt("lr", float, 0.2, "lr of the masks, constant", check=in_range(0, lo_open=True)),
    Opt("mask_momentum", float, 0.9, "SGD momentum of the masks (no weight decay)", check=in_range(0, 1)),
    Opt("anp_eps", float, 0.4, "perturbation budget eps", check=in_range(0)),
    Opt("anp_steps", int, 1, "inner steps, each of size eps / anp_steps", check=in_range(1)),
    Opt("anp_alpha", float, 0.2, "weight of the unperturbed loss", check=in_range(0, 1)),
    Opt("clip_noise", bool, False, "clamp the perturbations to [-eps, eps] after every inner step"),
    *pruning_options(0.2),
    *augment_options(),
]


# --- 1. one iteration: the inner maximisation, the outer loss, the mask step ----------------------------------

def ce(model, x, y, precision):
    with precision.autocast():
        logits = model(precision.prepare_input(x))
    return F.cross_entropy(logits.float(), y), logits


def draw_noise(layers, eps, gen):
    """A fresh start delta, xi ~ U(-eps, eps) for every neuron."""
    with torch.no_grad():
        for layer in layers:
            for p in (layer.noise_w, layer.noise_b):
                p.copy_(to_device(torch.rand(p.shape, generator=gen) * (2 * eps) - eps, p.device))


def inner_steps(w, layers, x, y, eps, steps, clip, precision):
    """`steps` signed ascent steps of size eps / steps on the perturbed loss (sign(0) = 0); no projection unless
    clip (the originals' |delta| <= 2 eps)."""
    noise = [p for layer in layers for p in (layer.noise_w, layer.noise_b)]
    set_perturbed(layers, True)
    for _ in range(steps):
        grads = torch.autograd.grad(ce(w, x, y, precision)[0], noise)
        with torch.no_grad():
            for p, g in zip(noise, grads):
                p.add_(g.sign(), alpha=eps / steps)
                if clip:
                    p.clamp_(-eps, eps)


def outer_loss(w, layers, x, y, eps, alpha, precision):
    """L = alpha L_nat + (1 - alpha) L_rob, two separate forwards (one batch each: train-mode BN statistics);
    L_rob = 0 when eps = 0, as in the original."""
    l_rob = torch.zeros((), device=y.device)
    if eps > 0:
        set_perturbed(layers, True)
        l_rob = ce(w, x, y, precision)[0]
    set_perturbed(layers, False)
    l_nat, logits = ce(w, x, y, precision)
    return alpha * l_nat + (1 - alpha) * l_rob, l_nat, l_rob, logits


def mask_step(layers, loss, opt):
    """SGD (momentum, no weight decay) on the masks only, then the masks clamped to [0, 1]."""
    masks = [layer.mask for layer in layers]
    for m, g in zip(masks, torch.autograd.grad(loss, masks)):
        m.grad = g
    opt.step()
    with torch.no_grad():
        for m in masks:
            m.clamp_(0, 1)


def anp_iteration(w, layers, x, y, cfg, opt, noise_gen, precision):
    eps = cfg["anp_eps"]
    if eps > 0:
        draw_noise(layers, eps, noise_gen)
        inner_steps(w, layers, x, y, eps, cfg["anp_steps"], cfg["clip_noise"], precision)
    loss, l_nat, l_rob, logits = outer_loss(w, layers, x, y, eps, cfg["anp_alpha"], precision)
    mask_step(layers, loss, opt)
    return loss.detach(), l_nat.detach(), l_rob.detach(), logits.detach().argmax(1)


def chunk_sizes(nb_iter, print_every) -> list:
    """Exactly nb_iter iterations in chunks of print_every, the last one shorter."""
    return [min(print_every, nb_iter - i) for i in range(0, nb_iter, print_every)]


# --- 2. the phases: mask optimisation in chunks, then pruning --------------------------------------------------

def mask_phase(ctx, w, x, y, state) -> Phase:
    cfg, layers, opt = ctx.cfg, masked_layers(w), state["mask_opt"]
    hflip = ctx.record.dataset.info.hflip if cfg["hflip"] is None else cfg["hflip"]
    sizes = chunk_sizes(cfg["nb_iter"], cfg["print_every"])
    tau = torch.tensor(cfg["pruning_number"], dtype=torch.float32)

    def train_chunk(chunk):
        w.train()
        sums = [torch.zeros((), dtype=torch.float64, device=y.device) for _ in range(4)]
        for _ in range(sizes[chunk - 1]):
            idx = to_device(torch.randint(0, len(y), (cfg["batch_size"],), generator=state["sampler_gen"].gen),
                            y.device)
            xb = random_crop_flip(to_unit(x[idx]), state["aug_gen"].gen, cfg["crop_padding"], hflip)
            *losses, pred = anp_iteration(w, layers, xb, y[idx], cfg, opt, state["noise_gen"].gen, ctx.precision)
            for i, v in enumerate([*losses, (pred == y[idx]).float().mean()]):
                sums[i] = weighted_sum(sums[i], v, len(idx))
        n, m = sizes[chunk - 1] * cfg["batch_size"], mask_vector(layers)
        loss, l_nat, l_rob, acc = (s.item() / n for s in sums)
        return {"lr": opt.param_groups[0]["lr"], "iterations": sum(sizes[:chunk]), "train_loss": loss,
                "train_loss_nat": l_nat, "train_loss_rob": l_rob, "train_acc": acc, "mask_mean": m.mean().item(),
                "mask_min": m.min().item(),
                "n_mask_le_tau": int((m <= tau).sum()) if cfg["pruning_by"] == "threshold" else None}
    return Phase("mask", len(sizes), train_chunk, lambda: ctx.evaluate(w), label="mask chunk",
                 show=("train_acc", "mask_mean"))


@register("anp", "defense", paper="Wu & Wang, NeurIPS 2021", needs=("trained_model", "clean_subset"), options=OPTIONS,
          summary="Adversarial Neuron Pruning: BN-channel masks learned against adversarial neuron perturbations, "
                  "the lowest pruned")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("anp", OPTIONS, argv, __doc__, dataset=dataset)
    check_pruning(cfg, math.inf)
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("anp", cfg, args)
    try:
        x, y, _ = ctx.clean_subset(cfg["ratio"], False, cfg["index"])
        check_subset(ctx, y)
        model = ctx.attacked_model()
        check_pruning(cfg, len(neuron_table(model)))
        w = ctx.precision.prepare_model(masked_copy(ctx.record.model))
        layers = masked_layers(w)
        gen = lambda name: GeneratorState(generator(cfg["random_seed"], name))   # noqa: E731
        state = {"work": w, "precision": ctx.precision, "sampler_gen": gen("anp_sampler"),
                 "aug_gen": gen("augmentation"), "noise_gen": gen("anp_noise"),
                 "mask_opt": torch.optim.SGD([layer.mask for layer in layers], lr=cfg["lr"],
                                             momentum=cfg["mask_momentum"])}
        rows = fit(ctx.run, [mask_phase(ctx, w, x, y, state),
                             prune_phase(ctx, model, lambda: mask_vector(layers), x, y)], state)
        p = read_json(ctx.run.path / "pruned.json", "record file")
        apply_pruning(model, neuron_table(model), p["neurons"])   # also when a resume found the phase done
        extra = {k: v for k, v in p.items() if k not in ("neurons", "pruned")}
        return finish_defense(ctx, one_axis(rows), ctx.plain_payload(model), {
            **extra, "iterations": cfg["nb_iter"],
            "mask_seconds": round(sum(r["seconds"] for r in rows if r.get("phase") == "mask"), 3)})
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
