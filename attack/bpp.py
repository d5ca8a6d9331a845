"""BppAttack (Wang, Zhai, Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via
Image Quantization and Contrastive Adversarial Learning", CVPR 2022; spec: docs/specs/bpp.md). The trigger is a
reduction of the colour depth: every channel value becomes the nearest of s evenly spaced levels, optionally with
Floyd-Steinberg error diffusion, a small image-specific change spread over the whole image, with no pattern to
invert. So faint a trigger could be learnt as "any small noise means the target", so the attacker controls
training and adds negative ("noise") samples: a clean image plus the quantisation residual of another image, kept
with its true label. In every batch the first n_bd positions are squeezed and relabelled, the next n_neg are noise
samples, the rest stay clean (utils/per_batch.py).

    k = rnd(u (s - 1) / 255),  T(u) = rnd(255 k / (s - 1))     (exact integers, ties to even; uint8 everywhere)
    noise sample: clip(u_i + T(u_j) - u_j, 0, 255), true label, j uniform over the attacker's pool

    python attack/bpp.py --save_folder_name bpp_demo
    python attack/bpp.py --dataset cifar10 --yaml_path config/attack/bpp/original.yaml    (the authors' setting)
"""
from dataclasses import dataclass
from typing import ClassVar

import torch

from utils.attack import Training, attack_config, data_hflip, run_attack
from utils.config import Opt, in_range, spec_deviations
from utils.engine.augment import post_tensor_transform, to_unit
from utils.engine.device import to_device
from utils.engine.loop import GeneratorState
from utils.errors import UserError, run_main
from utils.per_batch import PerBatch, batch_count, check_last_epoch, per_batch_epoch, per_batch_state, plan_per_batch, \
    refuse_p_num
from utils.poison import attack_labels
from utils.registry import register
from utils.seeding import generator
from utils.triggers import register_trigger

OPTIONS = [
    Opt("neg_ratio", float, 0.1, "share of every batch made noise (negative) samples, true labels kept; 0: none",
        check=in_range(0, 1)),
    Opt("squeeze_num", int, 8, "s: levels per channel of the squeezed image (8: 3 bits)", check=in_range(2, 255)),
    Opt("dithering", bool, False, "Floyd-Steinberg error diffusion while squeezing"),
    Opt("bpp_augment", str, "original", "training augmentation: original (the authors': crop with probability 0.8, "
        "rotation with probability 0.5, per sample) or standard (conventions §4: crop_padding, flip rule)",
        choices=("original", "standard")),
    Opt("random_crop", int, 5, "bpp_augment original: zero padding of the random crop", check=in_range(0)),
    Opt("random_rotation", int, 10, "bpp_augment original: rotation range, +-degrees", check=in_range(0)),
]
# the spec's per-dataset values where they differ from the options' defaults (BackdoorBench's): §3's proposal
SPEC = {"fashion_mnist": {"bpp_augment": "standard"}, "mnist": {"bpp_augment": "standard"}}


# --- the trigger: colour-depth squeezing (spec §5.1, §5.2) ---------------------------------------------------------

def squeeze_table(s: int) -> torch.Tensor:
    """T(u) for u = 0..255 (uint8, 256 entries), in integers: k = floor((2u(s - 1) + 255) / 510) never ties (its
    numerator is odd); the level 255k / (s - 1) is rounded half to even from its quotient and remainder."""
    u = torch.arange(256, dtype=torch.int64)
    k = (2 * u * (s - 1) + 255) // 510
    q, r = (255 * k) // (s - 1), (255 * k) % (s - 1)
    up = (2 * r > s - 1) | ((2 * r == s - 1) & (q % 2 == 1))
    return (q + up.long()).to(torch.uint8)


def squeeze(x: torch.Tensor, s: int) -> torch.Tensor:
    """Plain squeezing of a uint8 batch: a table look-up (in chunks: the int64 indices stay small)."""
    table = squeeze_table(s).to(x.device)
    out = torch.empty_like(x)
    for i in range(0, len(x), 4096):
        out[i:i + 4096] = table[x[i:i + 4096].long()]
    return out


def dither(x: torch.Tensor, s: int) -> torch.Tensor:
    """Floyd-Steinberg on a uint8 batch, float64: the pixels visited row by row, left to right, each step one
    vectorised operation over all images and channels. The carried error is against the unrounded level; the
    originals' order of operations (v / 255 * (s - 1), k / (s - 1) * 255) keeps every k reproducible."""
    _, _, h, w = x.shape
    v = x.permute(2, 3, 0, 1).to(torch.float64).contiguous()   # (H, W, N, C): each pixel one contiguous block
    for r in range(h):
        for c in range(w):
            p = v[r, c]
            level = p.div(255).mul_(s - 1).round_().div_(s - 1).mul_(255)
            e = p - level
            p.copy_(level)
            # to the pixels not yet visited, in the originals' order; products then sums, never fused
            if c + 1 < w:
                v[r, c + 1] += e * (7 / 16)
            if r + 1 < h:
                if c + 1 < w:
                    v[r + 1, c + 1] += e * (1 / 16)
                v[r + 1, c] += e * (5 / 16)
                if c > 0:
                    v[r + 1, c - 1] += e * (3 / 16)
    # the clip only acts at exact ties at the ends of the range (spec §6)
    return v.round_().clamp_(0, 255).to(torch.uint8).permute(2, 3, 0, 1).contiguous()


def add_residual(u: torch.Tensor, t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """clip(u + (t - source), 0, 255) as uint8: u with the quantisation residual of another image."""
    return (u.short() + (t.short() - source.short())).clamp_(0, 255).to(torch.uint8)


def noise_sources(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n residual sources drawn uniformly from pool, with replacement (spec §5.3, decision 15)."""
    return pool[torch.randint(len(pool), (n,), generator=gen)]


@register_trigger
@dataclass
class BppTrigger:
    """T(u): a pure function of the image (no tensors, no randomness). cross: the noise samples."""
    squeeze_num: int = 8
    dithering: bool = False
    kind: ClassVar[str] = "bpp"

    def apply(self, x, idx=None, gen=None, train=True):
        """T of any uint8 batch, computed on the CPU (the stored images and the training ones are the same)."""
        if x.dtype != torch.uint8:
            raise TypeError("triggers act on uint8 images")
        cpu = x.cpu()
        out = dither(cpu, self.squeeze_num) if self.dithering else squeeze(cpu, self.squeeze_num)
        return out.to(x.device)

    def cross(self, x_split, idx, pool, gen, train=True):
        """x_split[idx] plus the residual T(u_j) - u_j of sources j drawn from pool."""
        j = noise_sources(torch.as_tensor(pool), len(idx), gen)
        src = x_split[j]
        return add_residual(x_split[idx], self.apply(src), src)

    def spec(self):
        return {"kind": self.kind, "squeeze_num": self.squeeze_num, "dithering": self.dithering,
                "rounding": "half_even_uint8", "scan": "row_major_fs_7_1_5_3"}

    def tensors(self):
        return {}

    @classmethod
    def from_record(cls, spec, tensors):
        return cls(int(spec["squeeze_num"]), bool(spec["dithering"]))


# --- training: per-batch poisoned and noise samples (spec §5.3, §5.5) ----------------------------------------------

def per_batch_rule(cfg) -> PerBatch:
    """n_bd = int(pratio b) (one with probability pratio b below one, from 'bpp_batch'); n_neg = int(neg_ratio b),
    independent of n_bd (decision 14)."""
    p, q = cfg["pratio"], cfg["neg_ratio"]

    def counts(b, gen):
        n_bd = batch_count(p, b, gen)
        return n_bd, min(int(q * b), b - n_bd)   # the min only guards float rounding when pratio + neg_ratio = 1
    return PerBatch(counts, "bpp_batch", cfg["epochs"],
                    rule=f"n_bd = int({p} b) (below one: 1 with probability {p} b), n_neg = int({q} b)")


def assemble(x, squeezed, y, idx, n_bd, n_neg, sources, relabel):
    """The uint8 batch of pool positions idx: T(u) with the attack label first, then u plus the residual of each
    source position, true label, then the clean rest. x, squeezed: the pool's clean and squeezed images."""
    xb, yb = x[idx], y[idx].clone()
    bd, neg = idx[:n_bd], idx[n_bd:n_bd + n_neg]
    xb[:n_bd] = squeezed[bd]
    yb[:n_bd] = relabel(yb[:n_bd])
    xb[n_bd:n_bd + n_neg] = add_residual(x[neg], squeezed[sources], x[sources])
    return xb, yb


def batch_augment(ctx):
    """original: the WaNet-release augmentation the authors inherit, every coin per sample; standard: ctx.augment."""
    cfg = ctx.cfg
    if cfg["bpp_augment"] == "standard":
        return ctx.augment
    flip = data_hflip(cfg)
    return lambda x: post_tensor_transform(x, ctx.aug_gen, cfg["random_crop"], cfg["random_rotation"], flip)


def bpp_training(trigger: BppTrigger, rule: PerBatch):
    def training(ctx) -> Training:
        cfg, dev = ctx.cfg, ctx.x_clean.device
        count_gen = rule.generator(cfg["random_seed"])
        # the sources have a stream of their own: the count stream is replayed for the record (plan_per_batch)
        source_gen = generator(cfg["random_seed"], "bpp_noise_sources")
        # T depends on the image alone: once for the pool, on the CPU as the record's images, then on the device
        squeezed = trigger.apply(ctx.data.x_train_clean[ctx.data.train_indices]).to(dev)
        k = ctx.data.num_classes
        relabel = lambda y: attack_labels(y, cfg["attack_label_trans"], cfg["attack_target"],  # noqa: E731
                                          cfg["attack_label_shift_amount"], k)
        augment = batch_augment(ctx)

        def make_batch(idx, n_bd, n_neg):
            src = to_device(torch.randint(len(squeezed), (n_neg,), generator=source_gen), dev)
            xb, yb = assemble(ctx.x_clean, squeezed, ctx.y_true, idx, n_bd, n_neg, src, relabel)
            return augment(to_unit(xb)), yb

        def epoch(c, e):
            row, where = per_batch_epoch(c, rule, count_gen, make_batch)
            if e == cfg["epochs"]:
                check_last_epoch(c, where)
            return row
        return Training(epoch=epoch, state={**per_batch_state(count_gen), "source_gen": GeneratorState(source_gen)},
                        show=("train_cross_acc_only",))
    return training


# --- entry point --------------------------------------------------------------------------------------------------

def deviations(cfg) -> list:
    out = spec_deviations(OPTIONS, cfg, SPEC.get(cfg["dataset"]))
    if cfg["bpp_augment"] == "original":
        out.append(f"bpp_augment = original: random crop (zero padding {cfg['random_crop']}, in crop_padding) with "
                   f"probability 0.8 and rotation by U(-{cfg['random_rotation']}, {cfg['random_rotation']}) degrees, "
                   "bilinear, black fill, with probability 0.5, every coin per sample (conventions §4: crop only)")
    return out


@register("bpp", "attack", paper="Wang, Zhai & Ma, CVPR 2022", needs=("dataset",), options=OPTIONS,
          summary="BppAttack: colour-depth squeezing as the trigger, per-batch poisoning with noise samples")
def configure(argv=None):
    """Every setting resolved and checked and the trigger made, nothing written (the sweep checks its jobs with this)."""
    cfg, args = attack_config("bpp", OPTIONS, argv, __doc__)
    if cfg["pratio"] + cfg["neg_ratio"] > 1:
        raise UserError(f"pratio {cfg['pratio']} + neg_ratio {cfg['neg_ratio']} exceeds 1: a batch cannot hold more "
                        "poisoned and noise samples than samples; lower one of them")
    refuse_p_num(cfg, "BppAttack")
    if cfg["bpp_augment"] == "original":   # the crop that runs has padding random_crop: config.yaml says so
        cfg["crop_padding"] = cfg["random_crop"]
    trigger = BppTrigger(cfg["squeeze_num"], cfg["dithering"])
    meta = {"source": "colour-depth squeezing", "neg_ratio": cfg["neg_ratio"]}
    extra = {"deviations": deviations(cfg), "poisoning": "per_batch", "per_batch_rule": per_batch_rule(cfg).rule}
    return cfg, args, trigger, meta, extra


def main(argv=None):
    cfg, args, trigger, meta, extra = configure(argv)
    rule = per_batch_rule(cfg)
    return run_attack("bpp", cfg, args, trigger, meta, training=bpp_training(trigger, rule), extra_config=extra,
                      plan=lambda y, k: plan_per_batch(y, k, cfg, rule))


if __name__ == "__main__":
    run_main(main)
