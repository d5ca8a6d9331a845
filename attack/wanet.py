"""WaNet (Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021, arXiv 2102.10369;
spec: docs/specs/wanet.md). The trigger is a fixed, smooth, image-wide geometric warp: every pixel is resampled a
fraction of a pixel away along a random but fixed displacement field (k x k control points upsampled bicubically).
The attacker controls training and poisons each batch as it is drawn: the first n_bd = int(pratio b) images are
warped and relabelled, the next int(n_bd cross_ratio) are warped by the field plus per-pixel random jitter and keep
their true label (the noise mode), so the network learns this field, not "any resampling artefact"; the whole
batch is then augmented (the release's crop and rotation, per sample).

    python attack/wanet.py --save_folder_name wanet_demo

Test sets and the record's representative training set are warped on the CPU in float64 from the stored float32
grid and rounded half to even to uint8 (bit for bit on any machine); training batches are warped on the device in
float32 and not quantised, as in both originals.
"""
import torch
import torch.nn.functional as F

from utils.attack import Training, attack_config, data_hflip, run_attack
from utils.config import Opt, in_range, spec_deviations
from utils.data import dataset_info
from utils.engine.augment import post_tensor_transform, to_unit
from utils.engine.device import to_device
from utils.engine.loop import GeneratorState
from utils.errors import UserError, run_main
from utils.per_batch import PerBatch, batch_count, check_last_epoch, per_batch_epoch, per_batch_state, plan_per_batch, \
    refuse_p_num
from utils.poison import attack_labels, tensor_sha256
from utils.registry import register
from utils.seeding import generator
from utils.triggers import register_trigger

OPTIONS = [
    Opt("cross_ratio", float, 2.0, "noise (cross) samples per batch = int(n_bd * cross_ratio); 0: no noise mode",
        check=in_range(0)),
    Opt("k", int, 4, "the warp's control grid is k x k", check=in_range(2)),
    Opt("s", float, 0.5, "warp strength (displacement about s/2 px on average, at most about s px)", check=in_range(0)),
    Opt("grid_rescale", float, 1.0, "factor on the whole sampling grid before the clamp (< 1: a slight zoom)",
        check=in_range(0, lo_open=True)),
    Opt("grid_seed", int, None, "seed of the control points (none: random_seed)", check=in_range(0)),
    Opt("wanet_aug", str, "wanet", "training augmentation: the release's per-sample crop and rotation (wanet; then "
        "crop_padding is set to random_crop) or conventions §4's crop and flip (standard)",
        choices=("wanet", "standard")),
    Opt("random_crop", int, 5, "wanet augmentation: zero padding of the random crop (probability 0.8)",
        check=in_range(0)),
    Opt("random_rotation", float, 10.0, "wanet augmentation: max rotation in degrees (probability 0.5, bilinear)",
        check=in_range(0)),
]
CHUNK = 2048   # images per float64 warp on the CPU: bounded memory for the stored sets


# --- the warp field (spec §5.1) and the noise grids (§5.2) ---------------------------------------------------------

def identity_grid(h: int) -> torch.Tensor:
    """I (H, W, 2), float32: I[i, j] = (a_j, a_i), a = linspace(-1, 1, H); channel 0 is the column (x) coordinate,
    grid_sample's convention."""
    a = torch.linspace(-1, 1, h)
    rows, cols = torch.meshgrid(a, a, indexing="ij")
    return torch.stack([cols, rows], dim=-1)


def control_points(k: int, seed: int) -> torch.Tensor:
    """P (2, k, k): U[-1, 1) from the run's 'wanet_grid' stream of `seed`, scaled so that mean |P| = 1."""
    p = 2 * torch.rand(1, 2, k, k, generator=generator(seed, "wanet_grid")) - 1
    return (p / p.abs().mean())[0]


def upsample_field(p: torch.Tensor, h: int) -> torch.Tensor:
    """N (H, W, 2): P upsampled bicubically (A = -0.75) with align_corners, so N's corners are P's corners."""
    return F.interpolate(p[None], size=(h, h), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)[0]


def make_grid(field: torch.Tensor, s: float, grid_rescale: float) -> torch.Tensor:
    """G = clamp((I + s N / H) grid_rescale, -1, 1), float32 (H, W, 2): the clamp keeps every sample point inside
    the image, so zero padding never shows (spec §6)."""
    h = field.shape[0]
    return ((identity_grid(h) + s * field / h) * grid_rescale).clamp(-1, 1)


def jitter(n: int, h: int, gen: torch.Generator) -> torch.Tensor:
    """J (n, H, W, 2) = U[-1, 1), one draw per image, pixel and axis, on the CPU generator (same stream everywhere)."""
    return 2 * torch.rand(n, h, h, 2, generator=gen) - 1


def noisy_grid(grid: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """G~ = clamp(G + J / H, -1, 1): the trigger field plus about +-0.5 px of independent jitter."""
    return (grid + j / grid.shape[-2]).clamp(-1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of the float batch x (n, C, H, W) at the grids (n, H, W, 2), align_corners."""
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


def warp_uint8(x: torch.Tensor, grids) -> torch.Tensor:
    """Spec §5.3: round_half_even(255 Warp(u / 255, G)) clipped to uint8, on the CPU in float64; grids(n) -> the
    float32 grids of the next n images (drawn chunk by chunk, in order)."""
    x = x.cpu()
    out = torch.empty_like(x)
    for i in range(0, len(x), CHUNK):
        xb = x[i:i + CHUNK].to(torch.float64) / 255
        out[i:i + CHUNK] = (warp(xb, grids(len(xb)).double()) * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out


@register_trigger
class WarpTrigger:
    """The fixed warp G (apply) and its noise mode G + jitter (cross); P and N are kept for the record."""
    kind = "warp"

    def __init__(self, control_points, field, grid, k, s, grid_rescale, grid_seed):
        self.control_points, self.field, self.grid = control_points, field, grid
        self.k, self.s, self.grid_rescale, self.grid_seed = int(k), float(s), float(grid_rescale), int(grid_seed)

    def apply(self, x, idx=None, gen=None, train=True):
        if x.dtype != torch.uint8:
            raise TypeError("triggers act on uint8 images")
        return warp_uint8(x, lambda n: self.grid.expand(n, -1, -1, -1)).to(x.device)

    def cross(self, x_split, idx, pool, gen, train=True):
        """x_split[idx], each through its own noise grid drawn from gen (the partners' pool plays no part)."""
        h = self.grid.shape[0]
        return warp_uint8(x_split[idx], lambda n: noisy_grid(self.grid, jitter(n, h, gen))).to(x_split.device)

    def spec(self):
        return {"kind": self.kind, "k": self.k, "s": self.s, "grid_rescale": self.grid_rescale,
                "grid_seed": self.grid_seed, "interpolation": "bilinear", "align_corners": True,
                "quantisation": "round_half_even_float64_cpu", "grid_sha256": tensor_sha256(self.grid)}

    def tensors(self):
        return {"control_points": self.control_points, "field": self.field, "grid": self.grid}

    @classmethod
    def from_record(cls, spec, tensors):
        return cls(tensors["control_points"], tensors["field"], tensors["grid"], spec["k"], spec["s"],
                   spec["grid_rescale"], spec["grid_seed"])

    def shift_px(self) -> dict:
        """Length of each pixel's displacement G - I in pixels (the originals' (H - 1) / 2 per normalised unit)."""
        h = self.grid.shape[0]
        d = ((self.grid - identity_grid(h)) * (h - 1) / 2).norm(dim=-1)
        return {"grid_max_shift_px": round(d.max().item(), 4), "grid_mean_shift_px": round(d.mean().item(), 4)}


def make_trigger(cfg, shape=None):
    """The warp of spec §5.1 for the dataset's (square) images, and its poison.json entries."""
    _, h, w = shape or dataset_info(cfg["dataset"]).shape
    if h != w:
        raise UserError(f"WaNet warps square images only (its grid uses H for both axes); {cfg['dataset']} is {h}x{w}")
    seed = cfg["random_seed"] if cfg["grid_seed"] is None else cfg["grid_seed"]
    p = control_points(cfg["k"], seed)
    n = upsample_field(p, h)
    trigger = WarpTrigger(p, n, make_grid(n, cfg["s"], cfg["grid_rescale"]), cfg["k"], cfg["s"], cfg["grid_rescale"],
                          seed)
    return trigger, {"cross_ratio": cfg["cross_ratio"], "cross_test_seed": "trigger_cross_test stream of trigger_seed",
                     **trigger.shift_px()}


# --- one training batch (spec §5.4) -------------------------------------------------------------------------------

def wanet_rule(cfg) -> PerBatch:
    """n_bd = int(pratio b) (below one: one with probability pratio b, 'wanet_batch' stream), n_cr = int(n_bd r),
    capped at the batch (only a tiny last batch under the low-ratio rule can reach it)."""
    rho, r = cfg["pratio"], cfg["cross_ratio"]

    def counts(b, gen):
        n_bd = batch_count(rho, b, gen)
        return n_bd, min(int(n_bd * r), b - n_bd)
    return PerBatch(counts, "wanet_batch", cfg["epochs"],
                    f"n_bd = int({rho} b) (one with probability {rho} b where that is below 1), "
                    f"n_cross = int(n_bd * {r}); first n_bd positions warped, next n_cross noise-warped")


def poison_batch(x_uint8, y, n_bd, n_cr, grid, noise_gen, relabel):
    """Steps 1-5: positions 0..n_bd-1 warped by G and relabelled, the next n_cr warped by G + fresh jitter with
    their true labels, the rest clean; float32 on the data's device, not quantised. grid: (1, H, W, 2)."""
    h, dev = grid.shape[1], x_uint8.device
    x = to_unit(x_uint8)
    j = to_device(jitter(n_cr, h, noise_gen), dev)   # drawn even when n_cr = 0 (no values): a fixed order
    x = torch.cat([warp(x[:n_bd], grid.expand(n_bd, -1, -1, -1)), warp(x[n_bd:n_bd + n_cr], noisy_grid(grid, j)),
                   x[n_bd + n_cr:]])
    return x, torch.cat([relabel(y[:n_bd]), y[n_bd:]])


def wanet_training(cfg, trigger, rule):
    def training(ctx) -> Training:
        count_gen = rule.generator(cfg["random_seed"])
        noise_gen = generator(cfg["random_seed"], "wanet_noise")
        grid = trigger.grid.to(ctx.x_clean.device)[None]
        k = ctx.data.num_classes
        relabel = lambda y: attack_labels(y, cfg["attack_label_trans"], cfg["attack_target"],  # noqa: E731
                                          cfg["attack_label_shift_amount"], k)
        if cfg["wanet_aug"] == "wanet":
            flip = data_hflip(cfg)
            augment = lambda x: post_tensor_transform(x, ctx.aug_gen, cfg["random_crop"],  # noqa: E731
                                                      cfg["random_rotation"], flip)
        else:
            augment = ctx.augment

        def make_batch(idx, n_bd, n_cr):
            x, y = poison_batch(ctx.x_clean[idx], ctx.y_true[idx], n_bd, n_cr, grid, noise_gen, relabel)
            return augment(x), y   # the whole batch, poisoned and noise samples included (step 6)

        def epoch(c, e):
            row, where = per_batch_epoch(c, rule, count_gen, make_batch, desc="wanet")
            if e == cfg["epochs"]:
                check_last_epoch(c, where)
            return row
        return Training(epoch=epoch, state={**per_batch_state(count_gen), "noise_gen": GeneratorState(noise_gen)},
                        show=("train_asr_bd_only", "train_cross_acc_only"))
    return training


# --- configuration -------------------------------------------------------------------------------------------------

def check_options(cfg):
    """Spec §5.4's config-time checks that the options' ranges cannot express."""
    rho, r, b = cfg["pratio"], cfg["cross_ratio"], cfg["batch_size"]
    refuse_p_num(cfg, "WaNet")
    if rho * (1 + r) > 1:
        raise UserError(f"pratio {rho} with cross_ratio {r} asks for {rho * (1 + r):.4g} of every batch (poisoned plus "
                        "noise samples); pratio * (1 + cross_ratio) must be at most 1")
    if cfg["grid_rescale"] > 1:
        print(f"warning: grid_rescale {cfg['grid_rescale']} > 1 pushes sample points outside the image; the clamp "
              "then flattens the border")
    if rho * b < 1:
        print(f"warning: pratio * batch_size = {rho * b:.4g} < 1: each batch poisons one sample with that probability "
              "(BackdoorBench's rule), so the number of poisoned samples varies from epoch to epoch")


def wanet_deviations(cfg) -> list:
    out = spec_deviations(OPTIONS, cfg, skip={"grid_seed"})
    if cfg["drop_last"]:
        out.append("drop_last = True (both originals keep the last incomplete batch; spec §7 row 15)")
    if cfg["wanet_aug"] == "wanet":
        out.append(f"training augmentation: WaNet's (crop with padding {cfg['random_crop']} with probability 0.8, "
                   f"rotation within +-{cfg['random_rotation']} degrees, bilinear, with probability 0.5, each per "
                   "sample; flip by the dataset's rule) instead of conventions §4 (spec §5.5)")
    return out


@register("wanet", "attack", paper="Nguyen & Tran, ICLR 2021", needs=("dataset",), options=OPTIONS,
          summary="WaNet: an imperceptible fixed warp, per-batch poisoning with noise-warped samples that keep "
                  "their label")
def configure(argv=None):
    """Every setting resolved and checked and the trigger made, nothing written (the sweep checks its jobs)."""
    cfg, args = attack_config("wanet", OPTIONS, argv, __doc__)
    check_options(cfg)
    if cfg["wanet_aug"] == "wanet":   # the crop that runs is random_crop's: config.yaml and the deviations say so
        cfg["crop_padding"] = cfg["random_crop"]
    trigger, meta = make_trigger(cfg)
    extra = {"deviations": wanet_deviations(cfg), "warp_field": trigger.shift_px()}
    return cfg, args, trigger, meta, extra


def main(argv=None):
    cfg, args, trigger, meta, extra = configure(argv)
    rule = wanet_rule(cfg)
    return run_attack("wanet", cfg, args, trigger, meta, training=wanet_training(cfg, trigger, rule),
                      extra_config=extra, plan=lambda y, k: plan_per_batch(y, k, cfg, rule))


if __name__ == "__main__":
    run_main(main)
