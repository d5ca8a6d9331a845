"""i-BAU, Implicit Backdoor Adversarial Unlearning (Zeng, Chen, Park, Mao, Jin, Jia, "Adversarial Unlearning of
Backdoors via Implicit Hypergradient", ICLR 2022, arXiv 2110.03735; spec: docs/specs/ibau.md).

The backdoor is modelled as one unknown universal perturbation delta added to every input. Each round, delta is
found by SGD on the clean subset to flip the model's own predictions (the inner maximisation, a surrogate of the
trigger); then the model is trained to classify correctly despite it (the outer minimisation), differentiating
through the inner problem with the implicit function theorem: the hypergradient
g = d_theta L_out + d_theta Phi^T sum_{t<K} (d_delta Phi^T)^t d_delta L_out, a truncated fixed-point (Neumann)
iteration through the inner gradient-descent map Phi(delta) = delta - eta_in d_delta L_in. Eval mode throughout.

    python defense/ibau.py --result_file badnet_demo

Project decisions (spec §7): the clean subset from the training data (the authors use test images); delta lives in
pixel space by default (`pert_space normalized` is BackdoorBench's); nothing clamps x + delta; the perturbation pass
and the hypergradient always run in fp32; only the originals' fraction `unlearn_portion` of each outer batch carries
delta; the cached outer batches and every random draw come from named generators, so --resume is exact.
"""
import io
import math
import time

import torch
import torch.nn.functional as F

from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.epoch import batch_indices, progress
from utils.engine.evaluate import predict
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import fused
from utils.errors import run_main
from utils.options import clean_subset_options
from utils.plots import _png, _show, plt
from utils.registry import register
from utils.seeding import generator


def betas(v):
    """Adam's (beta1, beta2): a list or 'b1,b2'."""
    parts = v if isinstance(v, (list, tuple)) else str(v).strip("()[] ").split(",")
    out = [float(p) for p in parts]
    if len(out) != 2 or not all(0 <= b < 1 for b in out):
        raise ValueError("expected two numbers in [0, 1), e.g. 0.9,0.999")
    return out


OPTIONS = [
    *clean_subset_options(ratio=0.05),   # floor(N * ratio), uniform
    Opt("batch_size", int, 256, "batch size of the cached outer batches and of the perturbation pass (last batch "
        "kept)", check=in_range(1)),
    Opt("n_rounds", int, 5, "outer rounds: one perturbation pass, then one hypergradient step per cached batch",
        check=in_range(1)),
    Opt("K", int, 5, "fixed-point iterations per hypergradient (0: the direct gradient only)", check=in_range(0)),
    Opt("client_optimizer", str, "adam", "outer optimiser over all model parameters", choices=("adam",)),
    Opt("lr", float, 1e-4, "outer learning rate, constant (the originals' scheduler is never stepped)",
        check=in_range(0, lo_open=True)),
    Opt("amsgrad", bool, True, "Adam's AMSGrad variant (BackdoorBench's factory always sets it)"),
    Opt("adam_betas", betas, [0.9, 0.999], "Adam's betas, e.g. 0.9,0.999"),
    Opt("wd", float, 0.0, "Adam's weight decay", check=in_range(0)),
    Opt("pert_lr", float, 10.0, "SGD step of the perturbation pass (eta_delta)", check=in_range(0, lo_open=True)),
    Opt("pert_reg", float, 0.001, "weight lambda of ||delta||^2 in the inner objectives", check=in_range(0)),
    Opt("inner_step", float, 0.1, "step eta_in of the fixed-point map Phi", check=in_range(0, lo_open=True)),
    Opt("unlearn_portion", float, 0.01, "fraction of each outer batch that carries delta (floor(b * p) samples; "
        "1.0: the paper's objective)", check=in_range(0, 1)),
    Opt("fp_tol", float, 1e-10, "stop the fixed-point iteration once ||v_k - v_(k-1)|| < fp_tol", check=in_range(0)),
    Opt("pert_radius", float, None, "project delta onto this L2 ball after the pass (none: no projection; the "
        "authors' CIFAR notebook: 10)", check=in_range(0, lo_open=True)),
    Opt("pert_space", str, "pixel", "delta added to [0, 1] images (the authors) or to the normalised tensor "
        "(BackdoorBench)", choices=("pixel", "normalized")),
    Opt("augment", bool, True, "training augmentation of the cached batches and the perturbation pass "
        "(BackdoorBench; the authors use none)"),
    Opt("crop_padding", int, 4, "random-crop padding of that augmentation (0: no crop)", check=in_range(0)),
    Opt("hflip", bool, None, "random horizontal flip (default: the dataset's rule, cifar10 only)"),
]


# --- 1. the perturbed input ----------------------------------------------------------------------------------

def perturbation_scale(model, space: str):
    """None in pixel space; under `normalized` the per-channel std s of the model's normalisation, so that
    normalize(x + s * delta) = normalize(x) + delta, BackdoorBench's perturbation of the normalised tensor."""
    return None if space == "pixel" else model.normalize.std.detach().float()


def perturb(x, delta, scale=None):
    """x (+) delta, broadcast over the batch; never clamped (conventions §1)."""
    return x + (delta if scale is None else scale * delta)


def in_pixels(delta, scale=None):
    return delta if scale is None else scale * delta


# --- 2. the inner maximisation: one universal perturbation per round ---------------------------------------------

def perturbation_pass(model, batches, pert_lr: float, pert_reg: float, scale=None):
    """delta from 0, one plain SGD step per batch on J = -mean CE(f(x + delta), y^) + lambda ||delta||^2, where y^
    are the model's own predictions on the clean batch. Returns (delta, mean J weighted by batch size)."""
    delta, j_sum, n = None, 0.0, 0
    for x in batches:
        if delta is None:
            delta = torch.zeros_like(x[:1])
        with torch.no_grad():
            y_hat = model(x).argmax(1)
        d = delta.requires_grad_(True)
        j = -F.cross_entropy(model(perturb(x, d, scale)).float(), y_hat) + pert_reg * d.pow(2).sum()
        grad, = torch.autograd.grad(j, d)
        delta = (d - pert_lr * grad).detach()
        j_sum, n = j_sum + j.detach().double() * len(x), n + len(x)
    return delta, (j_sum / n)


def project(delta, radius):
    """delta * min(1, R / ||delta||): the L2 ball of the authors' CIFAR notebook (off by default)."""
    if radius is None:
        return delta
    return delta * torch.clamp(radius / (delta.norm() + 1e-12), max=1.0)


# --- 3. the outer objective and the implicit hypergradient ----------------------------------------------------------

def inner_loss(model, x1, y1, delta, pert_reg: float, scale=None):
    """L_in = -mean CE(f(x1 + delta), y1) + lambda ||delta||^2 on the first cached batch, true labels."""
    return -F.cross_entropy(model(perturb(x1, delta, scale)).float(), y1) + pert_reg * delta.pow(2).sum()


def outer_selection(b: int, portion: float, gen: torch.Generator):
    """S_j: floor(b * p) distinct indices of the batch (2 of 256, 1 of 196, none below 100 at p = 0.01)."""
    return torch.randperm(b, generator=gen)[:math.floor(b * portion)]


def outer_loss(model, x, y, delta, sel, scale=None):
    """L_out = mean over the whole batch of CE(f(x~), y), x~ = x + delta on the samples of S_j only."""
    mask = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    mask[sel.to(x.device)] = True
    xt = torch.where(mask[:, None, None, None], perturb(x, delta, scale), x)
    return F.cross_entropy(model(xt).float(), y)


def hypergradient(l_in, l_out, delta, params, K: int, inner_step: float, tol: float):
    """g = d_theta L_out + (d_theta Phi)^T v_K with v_k = (d_delta Phi)^T v_(k-1) + a, v_0 = 0, a = d_delta L_out,
    Phi(delta) = delta - inner_step * d_delta L_in(delta, theta); stops after iteration k once ||v_k - v_(k-1)|| <
    tol. l_in, l_out: callables (delta, params) -> scalar. Returns (g, iterations run, d_theta L_out, L_out)."""
    delta = delta.detach().requires_grad_(True)
    o = l_out(delta, params)
    a, *c = torch.autograd.grad(o, [delta, *params], allow_unused=True)
    a = torch.zeros_like(delta) if a is None else a
    c = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, c)]   # grad_unused_zero
    if K == 0 or not bool(a.any()):   # no sample carries delta: v stays 0 and g is the plain gradient
        return c, 0, c, o.detach()
    g_in, = torch.autograd.grad(l_in(delta, params), delta, create_graph=True)
    phi = delta - inner_step * g_in
    v, iters = a, 1            # v_1 = (d_delta Phi)^T 0 + a = a exactly: the first product is skipped
    if float(a.norm()) >= tol:
        for _ in range(1, K):
            jv, = torch.autograd.grad(phi, delta, grad_outputs=v, retain_graph=True)
            v_new = jv + a
            iters += 1
            change, v = float((v_new - v).norm()), v_new
            if change < tol:
                break
    mixed = torch.autograd.grad(phi, params, grad_outputs=v, allow_unused=True)
    g = [ci if m is None else ci + m for ci, m in zip(c, mixed)]
    return g, iters, c, o.detach()


def global_norm(tensors):
    return torch.stack([t.float().norm() for t in tensors]).norm()


# --- 4. the round ------------------------------------------------------------------------------------------------

def cached_batches(x_uint8, y, batch_size: int, gen: torch.Generator, augment):
    """B_1..B_m: one shuffled, augmented pass drawn once from its own generator and reused in every round."""
    return [(augment(to_unit(x_uint8[idx]), gen), y[idx])
            for idx in batch_indices(len(y), batch_size, gen, device=x_uint8.device)]


def ibau_round(model, optimizer, cache, x_uint8, cfg, gens, augment, scale=None, net=None):
    """One perturbation pass (fresh shuffle and augmentation), then one hypergradient step per cached batch with
    delta fixed. net: the model's eager forward (a compiled graph has no double backward). Returns (the round's
    statistics, delta in pixel units)."""
    model.eval()
    params = list(model.parameters())
    net = model if net is None else net
    t0 = time.perf_counter()
    idx = batch_indices(len(x_uint8), cfg["batch_size"], gens["shuffle"], device=x_uint8.device)
    delta, j = perturbation_pass(net, (augment(to_unit(x_uint8[i]), gens["augmentation"]) for i in idx),
                                 cfg["pert_lr"], cfg["pert_reg"], scale)
    delta = project(delta, cfg["pert_radius"])
    with torch.no_grad():
        flips = sum(int((net(perturb(xb, delta, scale)).argmax(1) != net(xb).argmax(1)).sum()) for xb, _ in cache)
    pert_seconds = time.perf_counter() - t0
    x1, y1 = cache[0]
    l_in = lambda d, _: inner_loss(net, x1, y1, d, cfg["pert_reg"], scale)   # noqa: E731
    totals = {"unlearn_loss": 0.0, "fp_iters": 0, "hypergrad_norm": 0.0, "direct_grad_norm": 0.0,
              "implicit_grad_norm": 0.0}
    n_perturbed, t1 = 0, time.perf_counter()
    for xb, yb in progress(cache, "i-bau"):
        sel = outer_selection(len(yb), cfg["unlearn_portion"], gens["unlearn_select"])
        n_perturbed += len(sel)
        g, iters, c, o = hypergradient(l_in, lambda d, _: outer_loss(net, xb, yb, d, sel, scale), delta, params,
                                       cfg["K"], cfg["inner_step"], cfg["fp_tol"])
        for p, gi in zip(params, g):
            p.grad = gi.detach()            # replaces: nothing accumulates across steps
        optimizer.step()
        # the implicit term g - c is often orders of magnitude below c: its own norm, not a difference of norms
        for k, v in (("unlearn_loss", o), ("fp_iters", iters), ("hypergrad_norm", global_norm(g)),
                     ("direct_grad_norm", global_norm(c)), ("implicit_grad_norm", global_norm(
                         [a - b for a, b in zip(g, c)]))):
            totals[k] += float(v)
    optimizer.zero_grad(set_to_none=True)
    m = len(cache)
    d_px = in_pixels(delta, scale).detach()
    return {"lr": optimizer.param_groups[0]["lr"], "pert_norm": d_px.norm().item(),
            "pert_linf": d_px.abs().max().item(), "pert_loss": float(j),
            "pert_flip_rate": flips / sum(len(b) for _, b in cache),
            **{k: v / m for k, v in totals.items()}, "n_perturbed": n_perturbed,
            "pert_seconds": round(pert_seconds, 3), "hypergrad_seconds": round(time.perf_counter() - t1, 3)}, d_px


class Perturbations:
    """round -> delta (pixel units), kept in the checkpoint so that perturbations.pt survives a --resume."""

    def __init__(self):
        self.deltas = {}

    def state_dict(self):
        return {"deltas": dict(self.deltas)}

    def load_state_dict(self, d):
        self.deltas = dict(d["deltas"])


def perturbation_png(delta, image, title="") -> bytes:
    """The last delta min-max scaled to [0, 1], beside a clean image with delta added (display clamped)."""
    d = delta[0].float().cpu()
    fig, axes = plt.subplots(1, 3, figsize=(6, 2.4), squeeze=False)
    for ax, img, name in zip(axes[0], (image, (d - d.min()) / (d.max() - d.min() + 1e-12), (image + d).clamp(0, 1)),
                             ("clean", "delta (min-max)", "clean + delta")):
        _show(ax, img.float().cpu())
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


# --- main -----------------------------------------------------------------------------------------------------

def make_optimizer(params, cfg):
    """Adam over every parameter, constant lr (no scheduler: the originals build one and never step it)."""
    params = list(params)
    return torch.optim.Adam(params, lr=cfg["lr"], betas=tuple(cfg["adam_betas"]), weight_decay=cfg["wd"],
                            amsgrad=cfg["amsgrad"], **fused(params))


def spec_for(cfg, dataset):
    """The spec's per-dataset values (ibau.md §2-§3): the 28x28 recipes crop with the attack record's padding 1."""
    return {"crop_padding": 1} if dataset in ("mnist", "fashion_mnist") else {}


@register("i-bau", "defense", paper="Zeng et al., ICLR 2022", needs=("trained_model", "clean_subset"), options=OPTIONS,
          summary="i-BAU: unlearn a universal adversarial perturbation through the implicit hypergradient")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this). The options'
    defaults are the spec's CIFAR-size values (ibau.md §3); the mnist-family files' lr 1e-3 is a deviation."""
    return defense_config("i-bau", OPTIONS, argv, __doc__, dataset=dataset, spec_for=spec_for)


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("i-bau", cfg, args)
    try:
        x, y, _ = ctx.clean_subset(cfg["ratio"], balanced=False, index_file=cfg["index"])
        model = ctx.attacked_model().eval()
        if ctx.device.type == "cpu" and ctx.precision.channels_last:
            # measured: the double backward of a channels_last convolution is about 3x slower on a CPU
            model = model.to(memory_format=torch.contiguous_format)
        optimizer = make_optimizer(model.parameters(), cfg)
        hflip = ctx.record.dataset.info.hflip if cfg["hflip"] is None else cfg["hflip"]
        augment = ((lambda b, g: random_crop_flip(b, g, cfg["crop_padding"], hflip)) if cfg["augment"]
                   else (lambda b, g: b))
        scale = perturbation_scale(model, cfg["pert_space"])
        gens = {k: generator(cfg["random_seed"], k) for k in ("shuffle", "augmentation", "unlearn_select")}
        # rebuilt identically on --resume: nothing else draws from this generator
        cache = cached_batches(x, y, cfg["batch_size"], generator(cfg["random_seed"], "ibau_cache"), augment)
        empty = [len(b) for _, b in cache if math.floor(len(b) * cfg["unlearn_portion"]) == 0]
        if empty:
            print(f"warning: {len(empty)} of {len(cache)} outer batches (sizes {sorted(set(empty))}) carry no "
                  f"perturbed sample at unlearn_portion {cfg['unlearn_portion']}: their steps are plain fine-tuning")
        history = Perturbations()
        sets = ctx.eval_sets

        def one_round(r):
            row, d = ibau_round(model, optimizer, cache, x, cfg, gens, augment, scale,
                                net=model.forward if ctx.precision.compile else model)
            history.deltas[r] = d.cpu()
            return row

        def evaluate():
            m = ctx.evaluate(model)
            _, m["ra_test_loss"] = predict(model, sets.x_bd, ctx.precision, cfg["eval_batch_size"], sets.y_bd_true)
            return m

        state = {"model": model, "optimizer": optimizer, "precision": ctx.precision, "perturbations": history,
                 **{f"{k}_gen": GeneratorState(g) for k, g in gens.items()}}
        rows = fit(ctx.run, Phase("unlearn", cfg["n_rounds"], one_round, evaluate, label="round",
                                  show=("unlearn_loss", "pert_flip_rate", "pert_norm")), state)
        buf = io.BytesIO()
        torch.save(history.deltas, buf)
        ctx.run.write_file("perturbations.pt", buf.getvalue())
        last = history.deltas[max(history.deltas)]
        ctx.run.write_file("perturbation.png", perturbation_png(last, to_unit(x[0].cpu()),
                           f"i-BAU on {ctx.record.path.name}: round {max(history.deltas)}, ||delta|| "
                           f"{last.norm().item():.3f}"))
        return finish_defense(ctx, rows, ctx.plain_payload(model), {
            "n_rounds": cfg["n_rounds"], "K": cfg["K"], "updates": cfg["n_rounds"] * len(cache),
            "clean_subset_size": len(y), "pert_norm_last": rows[-1]["pert_norm"], "pert_space": cfg["pert_space"],
            "unlearn_portion": cfg["unlearn_portion"], "pert_flip_rate_first": rows[0]["pert_flip_rate"],
            "pert_flip_rate_last": rows[-1]["pert_flip_rate"],
            "round_seconds": round(sum(r["seconds"] for r in rows), 2),
            "hypergrad_seconds": round(sum(r["hypergrad_seconds"] for r in rows), 2)})
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
