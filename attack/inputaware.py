"""Input-Aware Dynamic Backdoor (IAD; Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020,
arXiv 2010.08138; spec: docs/specs/inputaware.md). The trigger is a function of the image: a pattern generator G and
a mask generator M map x to a pattern P(x) and a soft mask m(x), and the poisoned image is x + (P(x) - x) m(x).
M trains first, alone, towards sparse masks that differ as much as the images do (phase 1, clean_train_epochs
epochs), then stays frozen. The classifier C and G then train together on batches whose first n rows carry their
own trigger (attack label), the next n the trigger of another image (cross-trigger samples, true label: a trigger
must not transfer), the rest clean, plus a diversity loss that keeps different images' patterns apart.

    python attack/inputaware.py --save_folder_name inputaware_demo

`epochs` counts both phases (BackdoorBench's reading): C trains epochs - clean_train_epochs epochs. C's recipe is
the toolkit's: the spec's lr_C, schedulerC_milestones and schedulerC_lambda are lr, steplr_milestones and
steplr_gamma (lr_scheduler MultiStepLR). The stored images (test sets, the defenders' training set) are the final
generators applied on the CPU in float64 and rounded (spec §5.6); the per-epoch figures use the same formula in
fp32 on the run's device.
"""
import copy
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from utils.attack import Training, attack_config, data_hflip, run_attack
from utils.config import Opt, in_range, spec_deviations
from utils.data import dataset_info
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.epoch import batch_indices, progress, weighted_sum
from utils.engine.evaluate import eval_mode
from utils.engine.loop import GeneratorState, Phase
from utils.engine.optim import fused
from utils.errors import UserError, run_main
from utils.options import milestones
from utils.per_batch import CROSS, POISONED, PerBatch, batch_count, check_last_epoch, per_batch_epoch, \
    per_batch_state, plan_per_batch, refuse_p_num
from utils.poison import attack_labels
from utils.registry import register
from utils.seeding import derive_seed, generator
from utils.triggers import register_trigger

OPTIONS = [
    Opt("clean_train_epochs", int, 25, "phase 1: epochs of the mask generator M alone (part of epochs)",
        check=in_range(1)),
    Opt("lr_G", float, 0.01, "pattern generator G: Adam lr, betas (0.5, 0.9)", check=in_range(0, lo_open=True)),
    Opt("schedulerG_milestones", milestones, [200, 300, 400, 500], "G: MultiStepLR milestones (classifier epochs)"),
    Opt("schedulerG_lambda", float, 0.1, "G: factor at each milestone", check=in_range(0, 1, lo_open=True)),
    Opt("lr_M", float, 0.01, "mask generator M: Adam lr, betas (0.5, 0.9)", check=in_range(0, lo_open=True)),
    Opt("schedulerM_milestones", milestones, [10, 20], "M: MultiStepLR milestones (mask epochs)"),
    Opt("schedulerM_lambda", float, 0.1, "M: factor at each milestone", check=in_range(0, 1, lo_open=True)),
    Opt("lambda_div", float, 1.0, "weight of the diversity losses (twice in M's loss, as the originals)",
        check=in_range(0)),
    Opt("lambda_norm", float, 100.0, "weight of the mask-density loss", check=in_range(0)),
    Opt("mask_density", float, 0.032, "mask budget rho_m", check=in_range(0, 1)),
    Opt("EPSILON", float, 1e-7, "guard in the denominators of the diversity ratios", check=in_range(0)),
    Opt("gen_channels", int, None, "generators' base width (default: 16 below 32 x 32 images, else 32)",
        check=in_range(1)),
    Opt("gen_steps", int, None, "generators' pooling steps (default: 2 below 32 x 32 images, else 3)",
        check=in_range(1)),
    Opt("quantize", str, "round", "stored images: round half to even, or trunc (BackdoorBench)",
        choices=("round", "trunc")),
    Opt("g_grad_accumulation", bool, True, "never clear G's gradients, as both originals (false: every step)"),
    Opt("materialize_cross", bool, True, "the defenders' training set also holds the last epoch's cross samples"),
    Opt("canonical_chunk", int, 256, "images per float64 chunk of the stored sets", check=in_range(1)),
]
BN_EPS, BN_MOMENTUM, EPS0, THRESHOLD = 1e-5, 0.05, 1e-7, (20.0, -10.0)


# --- the generators and the blend (spec §4, §5.2) ----------------------------------------------------------------

def block(c_in, c_out, relu=True):
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class Generator(nn.Module):
    """Encoder-decoder on the normalised image: per step two conv blocks and a 2 x 2 max-pool, a middle block, per
    step a bilinear x2 upsampling and two blocks halving the width; the last block has no ReLU. Returns the raw
    (pre-tanh) output: out_channels = C for G's pattern, 1 for M's mask."""

    def __init__(self, in_channels, out_channels, width, steps, mean=None, std=None):
        super().__init__()
        self.in_channels, self.out_channels, self.width, self.steps = in_channels, out_channels, width, steps
        layers, c = [], in_channels
        for s in range(steps):
            layers += [*block(c, width * 2 ** s), *block(width * 2 ** s, width * 2 ** s), nn.MaxPool2d(2)]
            c = width * 2 ** s
        layers += block(c, c)
        for s in range(steps):
            last = s == steps - 1
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), *block(c, c),
                       *block(c, out_channels if last else c // 2, relu=not last)]
            c //= 2
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(mean or [0.0] * in_channels).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or [1.0] * in_channels).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def squash(raw):
    """1/2 + tanh(u) / (2 + eps0): in [0, 1] (eps0 is lost in fp32, kept in float64; spec §6)."""
    return 0.5 + torch.tanh(raw) / (2 + EPS0)


def threshold(u):
    return squash(THRESHOLD[0] * u + THRESHOLD[1])


def pattern_and_mask(G, M, x):
    return squash(G(x)), threshold(squash(M(x)))


def blend(x, p, m):
    return x + (p - x) * m


def quantize(x, rule):
    v = x.clamp(0, 1) * 255
    return (v.round() if rule == "round" else v.floor()).to(torch.uint8)   # round: half to even


def check_steps(shape, steps):
    _, h, w = shape
    if h % 2 ** steps or w % 2 ** steps:
        raise UserError(f"gen_steps {steps} halves the image {steps} times, which needs sides divisible by "
                        f"{2 ** steps}; {h}x{w} allows gen_steps up to {min((h & -h), (w & -w)).bit_length() - 1}")


# --- distances and losses (spec §4, §5.4, §5.5) -------------------------------------------------------------

def distance(a, b, std):
    """Per sample sqrt(mean(((a - b) / std)^2)): the originals compare normalised images and patterns."""
    return ((a - b) / std).pow(2).flatten(1).mean(1).sqrt()


def mask_distance(a, b):
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


def diversity(d_in, d_out, lam, eps):
    return lam * (d_in / (d_out + eps)).mean()


def mask_norm(m, rho):
    """The density budget: mean relu(m - rho)."""
    return F.relu(m - rho).mean()


def mask_step(M, opt, x1, x2, std, cfg):
    """One phase-1 iteration: three passes of M (the first unused, as both originals: one more BN update),
    L_M = lambda_norm * mean relu(m1 - rho) + lambda_div * L_mdiv, L_mdiv already weighted by lambda_div."""
    with torch.no_grad():
        M(x1)
    m1, m2 = threshold(squash(M(x1))), threshold(squash(M(x2)))
    norm = mask_norm(m1, cfg["mask_density"])
    div = diversity(distance(x1, x2, std), mask_distance(m1, m2), cfg["lambda_div"], cfg["EPSILON"])
    loss = cfg["lambda_norm"] * norm + cfg["lambda_div"] * div
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return torch.stack([loss, norm, div, m1.mean()]).detach()


class AttackBatch:
    """Phase 2 for one batch (spec §5.3, §5.5): rows() builds [poisoned | cross | clean] and L_div, loss() hands L_div
    to the classifier's loss, step() is G's Adam step after C's (its gradients kept when accumulating)."""

    def __init__(self, G, M, opt_G, cfg, num_classes):
        self.G, self.M, self.opt_G, self.cfg, self.k = G, M, opt_G, cfg, num_classes
        self.div, self.div_sum = None, None

    def rows(self, x1, x2, y, n):
        """x1: the (augmented) batch, x2: its partner batch, y: true labels, n: poisoned = cross rows."""
        cfg, y, x = self.cfg, y.clone(), x1
        self.div = x1.new_zeros(())
        if n > 0:   # G runs twice (its BN statistics of each call); M is frozen
            p1, p2 = squash(self.G(x1[:n])), squash(self.G(x2[n:2 * n]))
            with torch.no_grad():
                m1, m2 = threshold(squash(self.M(x1[:n]))), threshold(squash(self.M(x2[n:2 * n])))
            x = torch.cat([blend(x1[:n], p1, m1), blend(x1[n:2 * n], p2, m2), x1[2 * n:]])
            y[:n] = attack_labels(y[:n], cfg["attack_label_trans"], cfg["attack_target"],
                                  cfg["attack_label_shift_amount"], self.k)
            # pairs (x1_i, x2_{n+i}): each poisoned image against the image whose pattern made cross sample i
            self.div = diversity(distance(x1[:n], x2[n:2 * n], self.G.std), distance(p1, p2, self.G.std),
                                 cfg["lambda_div"], cfg["EPSILON"])
        self.b = len(y)
        return x, y

    def loss(self):
        self.div_sum = weighted_sum(self.div_sum, self.div, self.b)   # for the epoch's loss_div, read back once
        return self.div

    def step(self):
        self.opt_G.step()
        if not self.cfg["g_grad_accumulation"]:
            self.opt_G.zero_grad(set_to_none=True)


# --- the trigger: the generators, applied canonically (spec §5.6, §5.7) ------------------------------------------

def partners(idx, pool, gen):
    """The partner of each sample of idx, whose trigger it gets. idx the whole pool (the test set): a derangement,
    pi(sigma_k) = sigma_{k+1 mod N} for a random order sigma; otherwise uniform over the pool minus the sample."""
    idx, pool = torch.as_tensor(idx, dtype=torch.int64).cpu(), torch.as_tensor(pool, dtype=torch.int64).cpu()
    pool, n = pool.sort().values, len(pool)
    if len(idx) == n and torch.equal(idx.sort().values, pool):
        sigma = pool[torch.randperm(n, generator=gen)]
        nxt = torch.empty_like(pool)
        nxt[torch.searchsorted(pool, sigma)] = sigma.roll(-1)
        return nxt[torch.searchsorted(pool, idx)], True
    pos = torch.searchsorted(pool, idx).clamp(max=n - 1)
    inside = pool[pos] == idx
    r = (torch.rand(len(idx), generator=gen, dtype=torch.float64) * (n - inside.long())).long()
    return pool[r + (inside & (r >= pos)).long()], False


def state_sha256(module):
    import hashlib
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode() + v.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@register_trigger
class InputAwareTrigger:
    """apply: q(B(x; x)); cross: q(B(x_i; x_partner)), both in float64 on the CPU, G and M in eval mode, in chunks
    of `chunk` images (eval-mode BN: each image's result is independent of its companions). provisional: the
    trigger before training, whose images are placeholders (the clean ones) that run_attack replaces with those of
    final_trigger(); no complete record holds one."""
    kind: ClassVar[str] = "inputaware"

    def __init__(self, G, M, quantize="round", chunk=256, provisional=False):
        self.G, self.M, self.quantize, self.chunk, self.provisional = G, M, quantize, chunk, provisional
        self.drawn = {}      # the partners the last cross calls drew, for poison.json
        self._memo = None    # the test set's own poisoned images, made while its cross set was (apply reuses them)

    def canonical(self, x, source):
        """(q(B(x_i; source_i)), q(B(source_i; source_i))) for uint8 batches."""
        G, M = (copy.deepcopy(g).cpu().to(torch.float64, memory_format=torch.contiguous_format).eval()
                for g in (self.G, self.M))
        out, own = torch.empty_like(x), torch.empty_like(source)
        with torch.no_grad():
            for i in range(0, len(x), self.chunk):
                s = source[i:i + self.chunk].cpu().double() / 255
                p, m = pattern_and_mask(G, M, s)
                out[i:i + self.chunk] = quantize(blend(x[i:i + self.chunk].cpu().double() / 255, p, m), self.quantize)
                own[i:i + self.chunk] = quantize(blend(s, p, m), self.quantize)
        return out, own

    def apply(self, x, idx=None, gen=None, train=True):
        if x.dtype != torch.uint8:
            raise TypeError("triggers act on uint8 images")
        if self.provisional:
            return x.clone()
        if self._memo is not None and idx is not None and len(idx):
            keys, images, results = self._memo
            pos = torch.searchsorted(keys, torch.as_tensor(idx).cpu()).clamp(max=len(keys) - 1)
            if torch.equal(keys[pos], torch.as_tensor(idx).cpu()) and torch.equal(images[pos], x.cpu()):
                return results[pos].to(x.device)   # the same images: the same canonical result
        return self.canonical(x, x)[0].to(x.device)

    def cross(self, x_split, idx, pool, gen, train=True):
        if self.provisional:
            return x_split[idx].clone()
        partner, whole = partners(idx, pool, gen)
        self.drawn["test_partners" if whole else "cross_partners"] = partner.tolist()
        out, own = self.canonical(x_split[idx], x_split[partner])
        if whole:
            order = partner.argsort()
            self._memo = (partner[order], x_split[partner][order].cpu(), own[order])
        return out.to(x_split.device)

    def architecture(self):
        return {"in_channels": self.G.in_channels, "gen_channels": self.G.width, "gen_steps": self.G.steps,
                "out_channels": {"G": self.G.out_channels, "M": self.M.out_channels}, "bn_eps": BN_EPS,
                "bn_momentum": BN_MOMENTUM}

    def spec(self):
        return {"kind": self.kind, **self.architecture(), "eps0": EPS0, "threshold": list(THRESHOLD),
                "quantize": self.quantize, "canonical_chunk": self.chunk, "provisional": self.provisional,
                "G_sha256": state_sha256(self.G), "M_sha256": state_sha256(self.M),
                "application": "x' = q(x + (P(s) - x) m(s)), s = x (poisoned) or the partner (cross), float64 on "
                               "the CPU, generators in eval mode",
                "partner_rule": "test set: a derangement from a random order (generator trigger_cross_test); "
                                "training cross samples: uniform over the attacker's pool minus the sample "
                                "(trigger_cross_train)", **self.drawn}

    def tensors(self):
        return {**{f"G.{k}": v for k, v in self.G.state_dict().items()},
                **{f"M.{k}": v for k, v in self.M.state_dict().items()}}

    @classmethod
    def from_record(cls, spec, tensors):
        if spec.get("provisional"):
            raise ValueError("the trigger is the provisional one of an unfinished run")
        nets = []
        for name in ("G", "M"):
            net = Generator(spec["in_channels"], spec["out_channels"][name], spec["gen_channels"], spec["gen_steps"])
            net.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith(f"{name}.")})
            nets.append(net.eval())
        return cls(*nets, spec["quantize"], spec["canonical_chunk"])

    def trained(self, G, M):
        """The trigger with the generators as training left them."""
        return InputAwareTrigger(*(copy.deepcopy(g).cpu().eval() for g in (G, M)), self.quantize, self.chunk)


def make_generators(cfg):
    """G and M from their own seeded stream (in this order), whatever ran before them."""
    info = dataset_info(cfg["dataset"])
    c = info.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg["random_seed"], "inputaware_generators"))
        return [Generator(c, out, cfg["gen_channels"], cfg["gen_steps"], list(info.mean), list(info.std))
                for out in (c, 1)]


# --- the two phases (spec §5.1, §5.4, §5.5, §5.7) -----------------------------------------------------------

class GradState:
    """G's .grad in the checkpoint: when accumulating, the sum of every gradient since phase 2 began."""

    def __init__(self, module):
        self.module = module

    def state_dict(self):
        return {k: p.grad.detach().clone() for k, p in self.module.named_parameters() if p.grad is not None}

    def load_state_dict(self, d):
        for k, p in self.module.named_parameters():
            p.grad = d[k].to(p.device).clone() if k in d else None


def per_batch_rule(cfg):
    """n = int(pratio * b) poisoned rows (below one: Bernoulli) and as many cross rows (BackdoorBench's tie)."""
    ratio = cfg["pratio"]

    def counts(b, gen):
        n = min(batch_count(ratio, b, gen), b // 2)   # b // 2: a batch of one has no room for a cross row
        return n, n
    return PerBatch(counts, "bd_count", cfg["epochs"] - cfg["clean_train_epochs"],
                    rule=f"n = int({ratio} * b) poisoned rows (below 1: one with probability {ratio} * b, drawn from "
                         "'bd_count'), then n cross-trigger rows, the rest clean")


def inputaware_plan(y, k, cfg, rule):
    plan = plan_per_batch(y, k, cfg, rule)
    if not cfg["materialize_cross"]:
        plan.cross_indices = torch.empty(0, dtype=torch.int64)
    plan.per_batch.update({"classifier_epochs": rule.epochs,
                           "effective_fraction": plan.per_batch["full_batch"]["n_bd"] / cfg["batch_size"],
                           "cross_samples": "each blended with the trigger of a partner drawn uniformly from the "
                                            "attacker's pool minus itself (poison.json trigger.cross_partners), not "
                                            "the training batch's partner" if cfg["materialize_cross"] else
                                            "not materialised (materialize_cross false)"})
    return plan


def inputaware_training(ctx, trigger, rule):
    cfg, dev, n = ctx.cfg, ctx.x_clean.device, len(ctx.y_true)
    if ctx.precision.scaler is not None:
        raise UserError("fp16 autocast scales the loss, and G learns from it outside the gradient scaler: run with "
                        "--amp false on this card (bf16 cards are fine)")
    # the run's memory format for G and M too (channels_last: about 1.5x faster training steps on a CPU at width 4)
    fmt = torch.channels_last if ctx.precision.channels_last else torch.contiguous_format
    G, M = (copy.deepcopy(g).to(dev, memory_format=fmt) for g in (trigger.G, trigger.M))
    adam = lambda net, lr: torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.9), **fused(list(net.parameters())))
    opt_G, opt_M = adam(G, cfg["lr_G"]), adam(M, cfg["lr_M"])
    sched = lambda opt, who: torch.optim.lr_scheduler.MultiStepLR(opt, cfg[f"scheduler{who}_milestones"],
                                                                  cfg[f"scheduler{who}_lambda"])
    sched_G, sched_M = sched(opt_G, "G"), sched(opt_M, "M")
    seed = cfg["random_seed"]
    # the mask phase shuffles from streams of its own: per_batch replays 'shuffle' over the classifier epochs only
    gens = {k: generator(seed, k) for k in ("mask_shuffle", "mask_shuffle_cross", "shuffle_cross",
                                            "augmentation_cross")}
    count_gen = rule.generator(seed)
    augment_cross = lambda x: random_crop_flip(x, gens["augmentation_cross"], cfg["crop_padding"], data_hflip(cfg))
    step = AttackBatch(G, M, opt_G, cfg, ctx.data.num_classes)
    batches = lambda gen: batch_indices(n, cfg["batch_size"], gen, shuffle=True, drop_last=cfg["drop_last"], device=dev)

    def mask_epoch(e):
        M.train()
        lr = opt_M.param_groups[0]["lr"]
        sums = torch.zeros(4, dtype=torch.float64, device=dev)
        first, second = batches(gens["mask_shuffle"]), batches(gens["mask_shuffle_cross"])
        for i1, i2 in progress(zip(first, second), "mask", total=len(first)):
            x1, x2 = ctx.augment(to_unit(ctx.x_clean[i1])), augment_cross(to_unit(ctx.x_clean[i2]))
            sums += mask_step(M, opt_M, x1, x2, G.std, cfg).double() * len(i1)
        sched_M.step()
        loss, norm, div, density = (sums / sum(len(i) for i in first)).tolist()
        return {"lr": lr, "lr_M": lr, "mask_loss": loss, "mask_norm": norm, "mask_div": div,
                "mask_density_mean": density}

    partner_batches = []

    def make_batch(idx, n_bd, n_cross):
        x1, x2 = ctx.augment(to_unit(ctx.x_clean[idx])), augment_cross(to_unit(ctx.x_clean[partner_batches.pop(0)]))
        return step.rows(x1, x2, ctx.y_true[idx], n_bd)

    def attack_epoch(c, e):
        M.eval().requires_grad_(False)   # frozen for ever after phase 1 (also after a resume in phase 2)
        G.train()
        lr_G = opt_G.param_groups[0]["lr"]
        step.div_sum = torch.zeros((), dtype=torch.float64, device=dev)
        partner_batches[:] = batches(gens["shuffle_cross"])   # batch k of 'shuffle' pairs with batch k of this one
        row, where = per_batch_epoch(c, rule, count_gen, make_batch, desc="inputaware", extra_loss=step.loss,
                                     after_step=step.step)
        sched_G.step()
        if e == cfg["epochs"]:
            check_last_epoch(c, where if cfg["materialize_cross"] else {POISONED: where[POISONED],
                                                                        CROSS: torch.empty(0, dtype=torch.int64)})
        div = step.div_sum.item() / n
        return {**row, "lr_G": lr_G, "loss_ce": row["train_loss"] - div, "loss_div": div,
                "effective_pratio": row["n_bd_epoch"] / n}

    bd_idx = ctx.data.bd_test_indices.to(dev)
    every = torch.arange(len(ctx.data.y_test))
    test_partners = partners(every, every, generator(seed, "trigger_cross_test"))[0].to(dev)   # the canonical draw
    test_masks = []

    @torch.no_grad()
    def refresh():
        """The poisoned and cross test sets from the current generators: fp32 on the device, quantised as stored."""
        sets, bs = ctx.eval_sets, cfg["eval_batch_size"]
        x = to_unit(sets.x_test)
        if not test_masks:   # M is frozen in phase 2: its test masks once
            test_masks.append(torch.cat([threshold(squash(M(x[i:i + bs]))) for i in range(0, len(x), bs)]))
        with eval_mode(G):
            p = torch.cat([squash(G(x[i:i + bs])) for i in range(0, len(x), bs)])
        m = test_masks[0]
        sets.x_bd = quantize(blend(x[bd_idx], p[bd_idx], m[bd_idx]), cfg["quantize"])
        sets.x_cross = quantize(blend(x, p[test_partners], m[test_partners]), cfg["quantize"])

    return Training(
        epoch=attack_epoch, before_eval=refresh, epochs=rule.epochs, start=cfg["clean_train_epochs"] + 1,
        evaluate=lambda: {"mask_density_test": test_masks[0].mean().item() if test_masks else None},
        phases_before=(Phase("mask", cfg["clean_train_epochs"], mask_epoch, lambda: {},
                             show=("mask_loss", "mask_density_mean")),),
        state={"generator_G": G, "generator_M": M, "optimizer_G": opt_G, "scheduler_G": sched_G,
               "optimizer_M": opt_M, "scheduler_M": sched_M, "generator_G_grad": GradState(G),
               **{f"{k}_gen": GeneratorState(g) for k, g in gens.items()}, **per_batch_state(count_gen)},
        payload=lambda: {"generator_G_state_dict": G.state_dict(), "generator_M_state_dict": M.state_dict(),
                         "generators": trigger.architecture()},
        show=("train_asr_bd_only", "train_cross_acc_only", "loss_div"),
        final_trigger=lambda: trigger.trained(G, M))


# --- configuration -------------------------------------------------------------------------------------------

# BackdoorBench's recipe for C (the spec's lr_C, schedulerC_milestones, schedulerC_lambda; no drop_last)
RECIPE = {"lr": 0.01, "client_optimizer": "sgd", "sgd_momentum": 0.9, "wd": 0.0005, "lr_scheduler": "MultiStepLR",
          "steplr_milestones": [100, 200, 300, 400], "steplr_gamma": 0.1, "batch_size": 128, "drop_last": False}


@register("inputaware", "attack", paper="Nguyen & Tran, NeurIPS 2020", needs=("dataset",), options=OPTIONS,
          summary="Input-Aware: per-image triggers from a pattern and a mask generator, cross-trigger samples")
def configure(argv=None):
    """Every setting resolved and checked and the (untrained) trigger made, nothing written."""
    cfg, args = attack_config("inputaware", OPTIONS, argv, __doc__)
    shape = dataset_info(cfg["dataset"]).shape
    by_size = dict(zip(("gen_channels", "gen_steps"), (32, 3) if min(shape[1:]) >= 32 else (16, 2)))
    cfg.update({k: v for k, v in by_size.items() if cfg[k] is None})
    check_steps(shape, cfg["gen_steps"])
    refuse_p_num(cfg, "Input-Aware")
    if cfg["epochs"] <= cfg["clean_train_epochs"]:
        raise UserError(f"epochs {cfg['epochs']} leaves no classifier epoch after clean_train_epochs "
                        f"{cfg['clean_train_epochs']} (epochs counts both phases); raise epochs")
    if cfg["pratio"] > 0.5:
        raise UserError(f"pratio {cfg['pratio']}: a batch holds n poisoned and n cross rows, so at most 0.5")
    trigger = InputAwareTrigger(*make_generators(cfg), cfg["quantize"], cfg["canonical_chunk"], provisional=True)
    deviations = spec_deviations(OPTIONS, cfg, spec=by_size) + spec_deviations([], cfg, spec=RECIPE)
    deviations.append("G and M are initialised from their own seeded stream (inputaware_generators), not from the "
                      "global seed after C")
    extra = {"deviations": deviations, "classifier_epochs": cfg["epochs"] - cfg["clean_train_epochs"],
             "classifier_recipe": "lr_C = lr, schedulerC_milestones = steplr_milestones, schedulerC_lambda = "
                                  "steplr_gamma; milestones count classifier epochs"}
    return cfg, args, trigger, {"classifier_epochs": extra["classifier_epochs"]}, extra


def main(argv=None):
    cfg, args, trigger, meta, extra = configure(argv)
    rule = per_batch_rule(cfg)
    return run_attack("inputaware", cfg, args, trigger, meta,
                      training=lambda ctx: inputaware_training(ctx, trigger, rule), extra_config=extra,
                      plan=lambda y, k: inputaware_plan(y, k, cfg, rule))


if __name__ == "__main__":
    run_main(main)
