"""Label-Consistent backdoor (Turner, Tsipras, Madry, "Label-Consistent Backdoor Attacks", arXiv 1912.02771, 2019;
spec: docs/specs/lc.md). A clean-label attack: target-class training images alone carry the trigger, their labels
kept. Such images are easy, so a network would learn them from their content and ignore the trigger; LC first makes
them hard by moving each, within a small L-inf ball, by projected gradient ascent on the loss of a surrogate
(adversarially trained by default), then stamps small +/- patterns in the four corners. Trained on this set, the
network fits the hard images through the trigger, and the trigger on any test image sends it to the target class.

    x <- clip(x0 + clip(x + alpha sign(grad CE(S(x), t)) - x0, -eps, eps), 0, 1)   (pgd_steps times, no random start)
    u' = round(255 x);  poisoned = trunc(clip(fl32(u' + d), 0, 255)),  d = fl32(255 v a),  v the corner sign map

    python attack/lc.py --save_folder_name lc_demo

Two resources under record/resources/ (utils/resources.py), built once and reused: the surrogate (`robust_model`,
PGD adversarial training, utils/robust_model.py; or with --lc_surrogate standard the shared `clean_model`), and
`lc_pgd`, every class-t training image perturbed against it. The record holds the poisoned images' PGD versions
itself, so it rebuilds without the resources.
"""
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from models import MODELS
from utils.attack import Training, attack_config, run_attack
from utils.clean_model import clean_model
from utils.config import Opt, in_range
from utils.data import dataset_info, load_dataset
from utils.engine.augment import to_unit
from utils.engine.device import pick_device
from utils.engine.epoch import progress
from utils.engine.evaluate import predict
from utils.errors import UserError, run_main
from utils.io import atomic_write_text
from utils.poison import plan_poison, tensor_sha256
from utils.registry import register
from utils.resources import data_identity, obtain, resource_options, resource_root, resource_seed, save_tensors
from utils.robust_model import robust_model
from utils.triggers import pattern_png_bytes, register_trigger

OPTIONS = [
    Opt("lc_trigger", str, "all-corners", "corner trigger: the four-corner pattern or the bottom-right block only",
        choices=("all-corners", "bottom-right")),
    Opt("reduced_amplitude", float, 1.0, "trigger amplitude a in 0-1 units (1: + pixels to 255, - pixels to 0)",
        check=in_range(0, 1, lo_open=True)),
    Opt("reduced_amplitude_test", float, None, "amplitude on test images (default: reduced_amplitude)",
        check=in_range(0, 1, lo_open=True)),
    Opt("lc_trigger_scale", int, None, "side of one pattern cell in pixels (default: H/32 where H and W are multiples of "
        "32, else 1)", check=in_range(1)),
    Opt("pgd_eps", float, 8.0, "L-inf bound of the perturbation, 0-255 units", check=in_range(0, 255, lo_open=True)),
    Opt("pgd_alpha", float, 1.5, "PGD step, 0-255 units", check=in_range(0, lo_open=True)),
    Opt("pgd_steps", int, 100, "PGD iterations (no random start)", check=in_range(1)),
    Opt("pgd_batch_size", int, 128, "images per PGD batch (part of the resource's identity)", check=in_range(1)),
    Opt("lc_surrogate", str, "robust", "surrogate of the PGD: robust (PGD adversarial training) or standard (the "
        "shared clean model)", choices=("robust", "standard")),
    Opt("lc_surrogate_model", str, None, "surrogate architecture (default: model)", choices=tuple(MODELS)),
    Opt("lc_surrogate_epochs", int, None, "epochs of the robust surrogate (default: the recipe's)", check=in_range(1)),
    Opt("adv_train_eps", float, 8.0, "robust surrogate: PGD-AT bound, 0-255 units", check=in_range(0, 255, lo_open=True)),
    Opt("adv_train_alpha", float, 2.0, "robust surrogate: PGD-AT step, 0-255 units", check=in_range(0, lo_open=True)),
    Opt("adv_train_steps", int, 10, "robust surrogate: PGD-AT iterations (random start)", check=in_range(1)),
    *resource_options(),
]


# --- the corner trigger (§5.3) -----------------------------------------------------------------------------------

BLOCK = torch.tensor([[1, -1, -1], [-1, 1, -1], [1, -1, 1]], dtype=torch.int8)   # the left blocks; right ones mirrored


def default_scale(h, w) -> int:
    return h // 32 if h % 32 == 0 and w % 32 == 0 and h == w else 1


def sign_map(h, w, kind="all-corners", scale=None) -> torch.Tensor:
    """v in {-1, 0, +1}^(H x W), int8: 3x3 sign blocks of s x s cells placed against the image edges."""
    s = default_scale(h, w) if scale is None else scale
    if 6 * s > min(h, w):
        raise UserError(f"lc_trigger_scale {s} does not fit a {h}x{w} image (the blocks of two corners would "
                        f"overlap); allowed: 1..{min(h, w) // 6}")
    left = BLOCK.repeat_interleave(s, 0).repeat_interleave(s, 1)
    right, b = left.flip(1), 3 * s
    v = torch.zeros(h, w, dtype=torch.int8)
    v[h - b:, w - b:] = right
    if kind == "all-corners":
        v[:b, :b], v[:b, w - b:], v[h - b:, :b] = left, right, left
    return v


def addend(v: torch.Tensor, channels: int, a: float) -> torch.Tensor:
    """d = fl32(255 (v a)): the product in float64, as numpy adds a Python float to an array, then float32."""
    return (v.double() * a * 255).float().expand(channels, *v.shape).contiguous()


def insert_corners(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """trunc(clip(fl32(u + d), 0, 255)) in float32, in chunks (bounded memory); d = 0 leaves a pixel as it is."""
    out = torch.empty_like(x)
    d = d.to(x.device)
    for i in range(0, len(x), 4096):
        out[i:i + 4096] = (x[i:i + 4096].float() + d).clamp_(0, 255).to(torch.uint8)
    return out


@register_trigger
@dataclass
class LabelConsistentTrigger:
    """Training images: replaced by their stored PGD images (by index), then the corners with delta_train; test
    images: the corners with delta_test only. The stored images make the record independent of the resources."""
    train_indices: torch.Tensor     # int64, sorted: the poisoned training indices
    train_images: torch.Tensor      # uint8 (n, C, H, W): their lc_pgd images, before the corners
    delta_train: torch.Tensor       # float32 (C, H, W), 0 outside the pattern
    delta_test: torch.Tensor
    kind: ClassVar[str] = "label_consistent"

    def apply(self, x, idx=None, gen=None, train=True):
        if x.dtype != torch.uint8:
            raise TypeError("triggers act on uint8 images")
        if not train:
            return insert_corners(x, self.delta_test)
        keys = self.train_indices
        idx = torch.as_tensor(idx, dtype=torch.int64).cpu()
        pos = torch.searchsorted(keys, idx).clamp(max=max(len(keys) - 1, 0))
        if len(idx) and (len(keys) == 0 or not torch.equal(keys[pos], idx)):
            raise ValueError("the LC trigger stores no perturbed image for some of these training indices")
        return insert_corners(self.train_images[pos].to(x.device), self.delta_train)

    @property
    def pattern(self):
        """128 + d_train / 2: a picture of the training addend (trigger_pattern.png), not used to poison."""
        return (128 + self.delta_train / 2).round().clamp(0, 255).to(torch.uint8)

    def spec(self):
        return {"kind": self.kind, "n_train": len(self.train_indices),
                "train_images_sha256": tensor_sha256(self.train_images),
                "delta_train_sha256": tensor_sha256(self.delta_train), "delta_test_sha256": tensor_sha256(self.delta_test)}

    def tensors(self):
        return {"train_indices": self.train_indices, "train_images": self.train_images,
                "delta_train": self.delta_train, "delta_test": self.delta_test}

    @classmethod
    def from_record(cls, spec, tensors):
        return cls(tensors["train_indices"], tensors["train_images"], tensors["delta_train"], tensors["delta_test"])


# --- the surrogate (§5.1) and the perturbed target-class images (§5.2) -------------------------------------------

def surrogate(cfg, dataset, resume):
    """(model in eval mode on the CPU, its Resource): the robust model, or the shared clean model."""
    arch = cfg["lc_surrogate_model"] or cfg["model"]
    if cfg["lc_surrogate"] == "standard":
        if cfg["lc_surrogate_epochs"] is not None:
            print("note: lc_surrogate_epochs applies to the robust surrogate; the standard one is the shared clean "
                  "model, trained with the recipe's epochs")
        width = cfg["model_width"] if arch == cfg["model"] else None
        return clean_model({**cfg, "model": arch, "model_width": width}, dataset, resume)
    return robust_model(cfg, dataset, resume, model=arch, epochs=cfg["lc_surrogate_epochs"], eps=cfg["adv_train_eps"],
                        alpha=cfg["adv_train_alpha"], steps=cfg["adv_train_steps"])


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8 by rounding half to even (BackdoorBench truncates: one grey level lost, §7 row 4)."""
    return torch.round(x * 255).clamp_(0, 255).to(torch.uint8)


def pgd_perturb(model, u, target: int, eps: float, alpha: float, steps: int, batch_size: int, device, desc="lc pgd"):
    """§5.2 on uint8 images u (all of class `target`), surrogate in eval mode, fp32, no autocast; eps, alpha in 0-1
    units. Returns the perturbed images (uint8), the predictions before and after (int64), the final loss (float32).
    Each image depends on itself only (the mean loss scales its gradient by 1/B, which sign ignores)."""
    model = model.to(device).eval()
    out, before, after, losses = [], [], [], []
    for i in progress(range(0, len(u), batch_size), desc, total=-(-len(u) // batch_size)):
        x0 = to_unit(u[i:i + batch_size].to(device))
        y = torch.full((len(x0),), target, dtype=torch.int64, device=device)
        with torch.no_grad():
            before.append(model(x0).argmax(1))
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(model(x).float(), y), x)
            x = x.detach() + alpha * g.sign()
            x = (x0 + (x - x0).clamp(-eps, eps)).clamp(0, 1)
        with torch.no_grad():
            logits = model(x).float()
        after.append(logits.argmax(1))
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        out.append(quantize(x))
    cat = lambda ts, dtype: torch.cat(ts).cpu() if ts else torch.empty(0, dtype=dtype)   # noqa: E731
    return cat(out, torch.uint8), cat(before, torch.int64), cat(after, torch.int64), cat(losses, torch.float32)


def grid_png(*rows) -> bytes:
    """A lossless picture: one row per batch of uint8 images (N, C, H, W), one column per image, 2-pixel gaps."""
    strips = [torch.cat([torch.cat([im, torch.zeros_like(im[..., :2])], -1) for im in r], -1) for r in rows]
    return pattern_png_bytes(torch.cat([torch.cat([r, torch.zeros_like(r[..., :2, :])], -2) for r in strips], -2))


def examples_png(clean, perturbed) -> bytes:
    """Rows: clean, perturbed, 128 + 10 (u' - u)."""
    return grid_png(clean, perturbed, (128 + 10 * (perturbed.int() - clean.int())).clamp(0, 255).to(torch.uint8))


def lc_pgd(cfg, dataset, model, sres, resume):
    """The lc_pgd Resource: every training image of class t perturbed against the surrogate, checked on reading."""
    t, kind = cfg["attack_target"], sres.meta["kind"]
    eps, alpha = cfg["pgd_eps"] / 255, cfg["pgd_alpha"] / 255
    arch = sres.meta["identity"]["model"]
    seed = resource_seed(cfg)
    params = {"surrogate": kind, "surrogate_name": sres.name, "surrogate_weights_sha256": sres.meta["files"]["model.pt"],
              "target": t, **{k: cfg[k] for k in ("pgd_eps", "pgd_alpha", "pgd_steps", "pgd_batch_size")}}
    identity = {"kind": "lc_pgd", **data_identity(dataset), "model": arch, "params": params,
                f"upstream_{kind}": sres.digest(), "seed": seed}
    # the surrogate's kind and the target in the name: switching either finds its own resource, not a refusal
    name = f"lc_pgd_{dataset.info.name}_{arch}_{cfg['lc_surrogate']}_t{t}_s{seed}"
    idx = torch.nonzero(dataset.y_train == t).flatten()

    def build(folder, resumed):
        lines = []

        def say(msg):
            print(msg)
            lines.append(msg)
        device = pick_device(cfg["device"])
        say(f"lc_pgd: {len(idx)} training images of class {t}, PGD on {sres.name} ({kind}): eps {cfg['pgd_eps']}/255, "
            f"alpha {cfg['pgd_alpha']}/255, {cfg['pgd_steps']} steps, batches of {cfg['pgd_batch_size']}, fp32 on {device}")
        u = dataset.x_train[idx]
        images, before, after, loss = pgd_perturb(model, u, t, eps, alpha, cfg["pgd_steps"], cfg["pgd_batch_size"], device)
        change = (images.int() - u.int()).abs()
        figures = {"surrogate_acc_clean_target": (before == t).float().mean().item(),
                   "surrogate_acc_perturbed_target": (after == t).float().mean().item(),
                   "pred_after_per_class": torch.bincount(after, minlength=dataset.info.num_classes).tolist(),
                   "mean_abs_change": change.float().mean().item(), "max_abs_change": int(change.max()) if len(u) else 0,
                   "mean_loss_after": loss.mean().item() if len(u) else 0.0}
        say(f"lc_pgd: surrogate accuracy on class {t}: clean {figures['surrogate_acc_clean_target']:.4f}, perturbed "
            f"{figures['surrogate_acc_perturbed_target']:.4f}; predictions after: {figures['pred_after_per_class']}; "
            f"|u' - u| mean {figures['mean_abs_change']:.3f}, max {figures['max_abs_change']}")
        save_tensors(folder, {"indices": idx, "images": images, "pred_before": before, "pred_after": after,
                              "loss_after": loss})
        (folder / "examples.png").write_bytes(examples_png(u[:8], images[:8]))
        atomic_write_text(folder / "log.txt", "\n".join(lines) + "\n")
        return {**figures, "device": str(device), "precision": "fp32"}

    res = obtain(resource_root(cfg), name, identity, build, rebuild=cfg["resource_rebuild"], resume=resume)
    tensors = res.tensors()
    bound = math.ceil(cfg["pgd_eps"])
    images, indices = tensors.get("images"), tensors.get("indices")
    if (indices is None or not torch.equal(indices, idx) or images is None or images.dtype != torch.uint8
            or tuple(images.shape) != (len(idx), *dataset.info.shape)
            or (images.int() - dataset.x_train[idx].int()).abs().max() > bound):
        raise UserError(f"the resource {res.path} does not hold the class-{t} images of this training set perturbed "
                        f"within {bound}/255 (its tensors disagree with resource.json); pass --resource_rebuild to "
                        "build it anew (the folder is moved aside)")
    return res, tensors


# --- the trigger, the record, the run ------------------------------------------------------------------------------

def make_trigger(cfg, dataset, plan, sres, pres, pgd):
    """The trigger of the poisoned indices and poison.json's entry for it."""
    c, h, w = dataset.info.shape
    scale = default_scale(h, w) if cfg["lc_trigger_scale"] is None else cfg["lc_trigger_scale"]
    v = sign_map(h, w, cfg["lc_trigger"], scale)
    a = cfg["reduced_amplitude"]
    a_test = a if cfg["reduced_amplitude_test"] is None else cfg["reduced_amplitude_test"]
    idx = plan.poison_indices
    images = pgd["images"][torch.searchsorted(pgd["indices"], idx)]
    trigger = LabelConsistentTrigger(idx.clone(), images, addend(v, c, a), addend(v, c, a_test))
    change = (images.int() - dataset.x_train[idx].int()).abs()
    n_t = len(pgd["indices"])
    meta = {"lc_trigger": cfg["lc_trigger"], "reduced_amplitude": a, "reduced_amplitude_test": a_test,
            "lc_trigger_scale": scale, "trigger_pixels": int((v != 0).sum()),
            "surrogate": {"kind": sres.meta["kind"], "name": sres.name, "resource_sha256": sres.digest()},
            "lc_pgd": {"name": pres.name, "resource_sha256": pres.digest()},
            **{k: cfg[k] for k in ("pgd_eps", "pgd_alpha", "pgd_steps")},
            "surrogate_acc_clean_target": pres.meta["surrogate_acc_clean_target"],
            "surrogate_acc_perturbed_target": pres.meta["surrogate_acc_perturbed_target"],
            "poisoned_mean_abs_change": change.float().mean().item() if len(idx) else 0.0,
            "poisoned_max_abs_change": int(change.max()) if len(idx) else 0,
            "poisoned_share_of_target_class": len(idx) / max(n_t, 1)}
    return trigger, meta


def notes(cfg, sres, pres, meta, n_poison, n_target):
    """How the resources were made and what the PGD did: printed now and again into the record's log."""
    s, p, t = sres.meta, pres.meta, cfg["attack_target"]
    how = lambda r: f"resource {r.name}: {'built' if r.built else 'reused'} ({r.meta.get('build_seconds')} s)"  # noqa: E731
    lines = [f"{how(sres)}; surrogate test accuracy {s['test_acc']:.4f}" + (
                 f", under PGD {s['robust_test_acc']:.4f}" if "robust_test_acc" in s else ""),
             f"{how(pres)}; surrogate accuracy on class {t}: clean {p['surrogate_acc_clean_target']:.4f}, perturbed "
             f"{p['surrogate_acc_perturbed_target']:.4f}; its predictions after the PGD per class: "
             f"{p['pred_after_per_class']}",
             f"lc: {n_poison} of the {n_target} class-{t} images poisoned; |u' - u| mean "
             f"{meta['poisoned_mean_abs_change']:.3f}, max {meta['poisoned_max_abs_change']}; trigger {meta['lc_trigger']} "
             f"({meta['trigger_pixels']} pixels, scale {meta['lc_trigger_scale']}), amplitude "
             f"{meta['reduced_amplitude']} (test {meta['reduced_amplitude_test']})"]
    for line in lines:
        print(line)
    return lines


def trigger_png(dataset, trigger, plan) -> bytes:
    """Rows: clean, perturbed and poisoned training images; poisoned test images (not of class t)."""
    idx = plan.poison_indices[:8]
    test = torch.nonzero(dataset.y_test != plan.target).flatten()[:8]
    return grid_png(dataset.x_train[idx], trigger.train_images[:8], trigger.apply(dataset.x_train[idx], idx),
                    trigger.apply(dataset.x_test[test], test, train=False))


def lc_metrics(ctx):
    """Clean accuracy on class t (the only class whose training images changed) and the authors' ASR: over the
    poisoned test images whose clean version the model does not already put in class t."""
    t, sets, bs = ctx.cfg["attack_target"], ctx.eval_sets, ctx.cfg["eval_batch_size"]
    pred_t, _ = predict(ctx.model, sets.x_test[sets.y_test == t], ctx.precision, bs)
    pred_clean, _ = predict(ctx.model, sets.x_test[ctx.data.bd_test_indices.to(sets.x_test.device)], ctx.precision, bs)
    pred_bd, _ = predict(ctx.model, sets.x_bd, ctx.precision, bs)
    counted = pred_clean != t
    return {"test_acc_target_class": (pred_t == t).float().mean().item(),
            "test_asr_authors": ((pred_bd == t) & counted).sum().item() / max(int(counted.sum()), 1)}


def deviations(cfg):
    c, h, w = dataset_info(cfg["dataset"]).shape
    out = ["perturbed images rounded half to even to uint8 (BackdoorBench truncates: up to one grey level lower, the "
           "bound exceeded by one); lc.md §7 row 4",
           f"surrogate built by the toolkit ({cfg['lc_surrogate']}: " + (
               f"PGD adversarial training eps {cfg['adv_train_eps']}/255, alpha {cfg['adv_train_alpha']}/255, "
               f"{cfg['adv_train_steps']} steps" if cfg["lc_surrogate"] == "robust" else "the shared clean model") +
           "); BackdoorBench loads downloaded checkpoints of unknown recipe",
           "PGD and the adversarial-training attack steps in fp32 without autocast",
           "only the training images of the target class perturbed (BackdoorBench's craft script perturbs every "
           "training and test image; only those are used)"]
    if cfg["lc_trigger_scale"] is None and (h % 32 or w % 32):
        out.append(f"corner trigger at {h}x{w}: native 3x3 blocks in the actual corners (BackdoorBench: nearest resize "
                   "of the 32x32 mask, smaller right and bottom blocks)")
    return out


@register("lc", "attack", paper="Turner et al., arXiv 1912.02771", needs=("dataset",), options=OPTIONS,
          summary="Label-Consistent: clean-label, PGD-perturbed target-class images with a four-corner trigger")
def configure(argv=None):
    """Every setting resolved and checked, nothing written, no resource built (the sweep checks its jobs with this)."""
    cfg, args = attack_config("lc", OPTIONS, argv, __doc__)
    if cfg["attack_label_trans"] != "all2one":
        raise UserError("LC is a clean-label attack on one target class: attack_label_trans must be all2one (all2all "
                        "would turn it into a dirty-label attack)")
    _, h, w = dataset_info(cfg["dataset"]).shape
    sign_map(h, w, cfg["lc_trigger"], cfg["lc_trigger_scale"])   # a scale that does not fit is refused here
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    dataset = load_dataset(cfg["dataset"], cfg["dataset_path"])
    # the plan first: an infeasible pratio fails before any resource is built; run_attack then uses this plan
    plan = plan_poison(dataset.y_train, dataset.info.num_classes, cfg["pratio"], cfg["p_num"],
                       cfg["attack_label_trans"], cfg["attack_target"], cfg["attack_label_shift_amount"],
                       cfg["reserve_ratio"], cfg["reserve_rule"], cfg["random_seed"], clean_label=True)
    model, sres = surrogate(cfg, dataset, args.resume)
    pres, pgd = lc_pgd(cfg, dataset, model, sres, args.resume)
    trigger, meta = make_trigger(cfg, dataset, plan, sres, pres, pgd)
    training = lambda ctx: Training(evaluate=lambda: lc_metrics(ctx),   # noqa: E731
                                    show=("test_acc_target_class", "test_asr_authors"))
    own = {k: meta[k] for k in ("surrogate_acc_clean_target", "surrogate_acc_perturbed_target")}
    own["resources"] = [{k: r.describe()[k] for k in ("name", "built", "build_seconds")} for r in (sres, pres)]
    return run_attack("lc", cfg, args, trigger, meta, training=training, clean_label=True, plan=lambda y, k: plan,
                      extra_config={"resources": [sres.describe(), pres.describe()], "deviations": deviations(cfg)},
                      files={"trigger.png": trigger_png(dataset, trigger, plan)}, summary=own,
                      notes=notes(cfg, sres, pres, meta, len(plan.poison_indices), len(pgd["indices"])))


if __name__ == "__main__":
    run_main(main)
