"""What Adaptive-Blend and Adaptive-Patch (Qi et al., ICLR 2023; docs/specs/adaptive_blend.md, adaptive_patch.md)
share: the payload and regularisation ("cover") counts and draws (adaptive_blend.md §5.1, §5.3 items 1-2), the
authors' float32 insertion and its quantisation (§5.4), the options of both, the split a cross call works on, and the
partial-trigger ASR of the cover test set.

The payload is the plan's poison_indices (attack label t, indicator 1); the regularisation samples are its
cross_indices (true labels, altered images), which utils/poison.build_poisoned_data sends through trigger.cross and
the defenders' clean pool leaves out.
"""
import math

import torch

from utils.config import Opt, in_range
from utils.engine.evaluate import predict
from utils.errors import UserError
from utils.poison import PoisonPlan, draw_reserve
from utils.seeding import generator

def cover_options(rate):
    """The cover-set options; rate: the spec's default cover_rate (0.003 Adaptive-Blend, 0.006 Adaptive-Patch)."""
    return [
        Opt("cover_rate", float, rate, "regularisation (cover) samples as a fraction of the attacker's training set: "
            "the trigger planted, true label kept", check=in_range(0, 1, hi_open=True)),
        Opt("c_num", int, None, "absolute number of cover samples (overrides cover_rate)", check=in_range(0)),
        Opt("cover_exclude_target", bool, False, "draw cover samples from non-target classes only (the paper's "
            "wording; the authors' code draws from all classes)"),
    ]


QUANTISATION = "float32_unit_round_half_up"
CHUNK = 4096


def refuse_all2all(cfg, name):
    if cfg["attack_label_trans"] != "all2one":
        raise UserError(f"{name} is an all2one attack (the authors' code has no other mode): attack_label_trans must "
                        "be all2one")


# --- counts and selection (adaptive_blend.md §5.1, §5.3) ------------------------------------------------------------

def counts(n_a: int, pratio, p_num, cover_rate, c_num):
    """(n_p, n_c): round(rate * N_A) (conventions §7.2, half up) unless an absolute count is given."""
    n_p = int(p_num) if p_num else math.floor(pratio * n_a + 0.5)
    n_c = int(c_num) if c_num is not None else math.floor(cover_rate * n_a + 0.5)
    if n_p <= 0:
        raise UserError(f"pratio {pratio} of {n_a} training samples poisons no sample; raise pratio or set p_num")
    if n_p + n_c > n_a:
        raise UserError(f"{n_p} payload and {n_c} cover samples requested, {n_p + n_c} in all, but the attacker's "
                        f"training set holds {n_a}; lower pratio / p_num or cover_rate / c_num")
    return n_p, n_c


def plan_adaptive(y, num_classes, cfg, meta=None) -> PoisonPlan:
    """The payload P (generator 'poison_indices', uniform over the pool A, sorted: plan_poison's own draw) and the
    cover set R (generator 'cover_indices', uniform over A minus P, minus class t with cover_exclude_target, sorted).
    meta (the trigger meta written into poison.json) receives the counts."""
    seed, t = cfg["random_seed"], cfg["attack_target"]
    reserve, pool = draw_reserve(y, num_classes, cfg["reserve_ratio"], cfg["reserve_rule"], seed)
    n_p, n_c = counts(len(pool), cfg["pratio"], cfg["p_num"], cfg["cover_rate"], cfg["c_num"])
    poison = pool[torch.randperm(len(pool), generator=generator(seed, "poison_indices"))[:n_p]].sort().values
    rest = pool[~torch.isin(pool, poison)]
    if cfg["cover_exclude_target"]:
        rest = rest[y[rest] != t]
        if n_c > len(rest):
            raise UserError(f"{n_c} cover samples requested but only {len(rest)} non-target, non-payload samples are "
                            "in the attacker's training set; lower cover_rate / c_num or set cover_exclude_target false")
    cover = rest[torch.randperm(len(rest), generator=generator(seed, "cover_indices"))[:n_c]].sort().values
    if meta is not None:
        meta.update({"n_payload": n_p, "n_cover": n_c, "cover_rate": cfg["cover_rate"],
                     "conservatism": {"cover_over_planted": n_c / (n_p + n_c), "cover_over_payload": n_c / n_p},
                     "payload_of_target_class": int((y[poison] == t).sum()),
                     "cover_of_target_class": int((y[cover] == t).sum()), "cover_indices": cover.tolist()})
    return PoisonPlan("all2one", int(t), int(cfg["attack_label_shift_amount"]), reserve, poison, False, int(seed),
                      cross_indices=cover)


# --- insertion (adaptive_blend.md §5.4) -----------------------------------------------------------------------------

def fl32(a) -> torch.Tensor:
    return torch.tensor(float(a), dtype=torch.float32)


def to_unit(u: torch.Tensor) -> torch.Tensor:
    return u.to(torch.float32) / 255   # one correctly rounded IEEE division: fl32(u / 255)


def quantise(v: torch.Tensor) -> torch.Tensor:
    """torchvision's save_image: trunc(clip(fl32(fl32(255 v) + 0.5), 0, 255))."""
    return (v * 255 + 0.5).clamp_(0, 255).to(torch.uint8)


def blend_step(x: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fl32(x + fl32(w * fl32(p - x))), each operation its own float32 kernel (no fused multiply-add on the CPU)."""
    return x + w * (p - x)


def insert(u: torch.Tensor, p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u' for uint8 images u (N, C, H, W): pattern p uint8 (C, H, W) or (N, C, H, W), weight w = fl32(a) * M float32
    broadcastable to (N, 1, H, W) (a row per image or one for all). On the CPU, in chunks."""
    out = torch.empty_like(u)
    for i in range(0, len(u), CHUNK):
        pi = p[i:i + CHUNK] if p.dim() == 4 else p
        wi = w[i:i + CHUNK] if w.dim() == 4 and len(w) == len(u) else w
        out[i:i + CHUNK] = quantise(blend_step(to_unit(u[i:i + CHUNK]), to_unit(pi), wi))
    return out


# --- evaluation -----------------------------------------------------------------------------------------------------

def cover_test_asr(ctx) -> dict:
    """test_cross_asr: how often a training-style (partial, faint) trigger on a non-target test image is predicted t."""
    sets, t = ctx.eval_sets, ctx.cfg["attack_target"]
    keep = sets.y_test != t
    pred, _ = predict(ctx.model, sets.x_cross[keep], ctx.precision, ctx.cfg["eval_batch_size"])
    return {"test_cross_asr": (pred == t).float().mean().item()}


def recipe_deviations(args) -> list:
    """The authors' gtsrb augmentation is a +-15 degree rotation, which the standard recipe cannot do (specs §3.1)."""
    if "original_gtsrb" in str(getattr(args, "yaml_path", None) or ""):
        return ["no random rotation of +-15 degrees (the authors' gtsrb augmentation; the standard recipe has none)"]
    return []
