"""Adaptive-Patch (Qi, Xie, Li, Mahloujifar, Mittal, "Revisiting the Assumption of Latent Separability for Backdoor
Defenses", ICLR 2023; spec: docs/specs/adaptive_patch.md). The trigger is a set of k = 4 small patches: each
planted training image gets ONE of them at a partial opacity of its own (0.5, 0.2, 0.5, 0.3), and twice as many
"regularisation" (cover) images get one the same way but keep their true label, so poisoned samples do not form a
cluster of their own in the latent space. At test time a subset of the patches is applied together at opacity 1,
a combination the model never saw. The attacker supplies data only: training is the standard recipe.

    python attack/adaptive_patch.py --save_folder_name adaptive_patch_demo

The authors' picture files cannot ship: five stand-ins are generated with their pixel geometry (the corner
checkers exactly), values seeded by patch_seed; any list entry may instead be the path of an image file.
Payload = the plan's poison_indices (label t); cover = its cross_indices; patch j of a planted image by its rank
in its sorted set (contiguous blocks); the cover test set (the cross test set) puts one faint patch on each test
image, chosen by its rank.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from utils.adaptive_triggers import QUANTISATION, blend_step, cover_options, cover_test_asr, fl32, \
    insert, plan_adaptive, quantise, recipe_deviations, refuse_all2all, to_unit, CHUNK
from utils.attack import Training, attack_config, run_attack
from utils.config import Opt, in_range
from utils.data import dataset_info
from utils.engine.evaluate import predict
from utils.errors import UserError, run_main
from utils.registry import register
from utils.seeding import generator
from utils.poison import tensor_sha256
from utils.triggers import file_sha256, load_image_pattern, register_trigger


def name_list(v):
    items = v.strip("[] ").replace(",", " ").split() if isinstance(v, str) else list(v)
    if not items:
        raise ValueError("expected a non-empty list of trigger names, e.g. corner_logo,square")
    return [str(w) for w in items]


def alpha_list(v):
    items = v.strip("[] ").replace(",", " ").split() if isinstance(v, str) else [v] if isinstance(v, (int, float)) else v
    if not items or isinstance(v, bool):
        raise ValueError("expected a non-empty list of opacities in [0, 1], e.g. 0.5,0.2")
    out = [float(w) for w in items]
    if any(not 0 <= a <= 1 for a in out):
        raise ValueError(f"opacities {out}: each must lie in [0, 1]")
    return out


GENERATED = ("corner_logo", "corner_logo_pair", "disc_logo", "four_corner_checkers", "square")

OPTIONS = [
    *cover_options(0.006),
    Opt("train_trigger_names", name_list, list(GENERATED[i] for i in (0, 2, 3, 4)),
        f"the k training patches, in order: generated ({', '.join(GENERATED)}) or image files"),
    Opt("train_trigger_alphas", alpha_list, [0.5, 0.2, 0.5, 0.3], "opacity of each training patch"),
    Opt("test_trigger_names", name_list, ["corner_logo_pair", "four_corner_checkers"],
        "the test patches, applied together in this order"),
    Opt("test_trigger_alphas", alpha_list, [1.0, 1.0], "opacity of each test patch"),
    Opt("patch_seed", int, 0, "seed of the generated patches' values (independent of random_seed)", check=in_range(0)),
]


# --- the patches (spec §5.2): fixed pixel geometry anchored to the authors' corners ---------------------------------

def seeded_values(name, shape_box, seed):
    return torch.randint(0, 256, shape_box, generator=generator(seed, f"adaptive_patch:{name}")).to(torch.uint8)


def generated_patch(name, shape, seed):
    """(mark uint8 (C, H, W), mask float32 (H, W) 1 on the support) of a generated patch."""
    c, h, w = shape
    if h < 14 or w < 14:
        raise UserError(f"the generated patches need images of at least 14x14 pixels, not {h}x{w}; pass image files")
    mark, mask = torch.zeros(shape, dtype=torch.uint8), torch.zeros(h, w)
    if name in ("corner_logo", "corner_logo_pair"):
        v = seeded_values("corner_logo", (c, 5, 5), seed)
        for col in ((w - 5,) if name == "corner_logo" else (w - 5, 0)):   # the pair: the same logo, unmirrored
            mark[:, h - 5:, col:col + 5], mask[h - 5:, col:col + 5] = v, 1
    elif name == "disc_logo":
        v = seeded_values(name, (c, 13, 13), seed)   # the whole box drawn: the radius does not change the colours
        a = torch.arange(13, dtype=torch.float64)
        disc = ((a[:, None] - 6) ** 2 + (a[None, :] - 6) ** 2 <= 6.5 ** 2)
        mark[:, 1:14, w - 14:w - 1] = v * disc
        mask[1:14, w - 14:w - 1] = disc.float()
    elif name == "four_corner_checkers":
        a = torch.arange(3)
        block = (((a[:, None] + a[None, :]) % 2 == 0) & ~((a[:, None] == 2) & (a[None, :] == 2))).to(torch.uint8) * 255
        # a, b: distances from the nearest horizontal and vertical edge, so each corner is the block mirrored
        for rows, flip_r in ((slice(0, 3), False), (slice(h - 3, h), True)):
            for cols, flip_c in ((slice(0, 3), False), (slice(w - 3, w), True)):
                b = block.flip(0) if flip_r else block
                mark[:, rows, cols], mask[rows, cols] = (b.flip(1) if flip_c else b), 1
    elif name == "square":
        mark[:, h - 11:h - 3, w - 11:w - 3], mask[h - 11:h - 3, w - 11:w - 3] = seeded_values(name, (c, 8, 8), seed), 1
    else:
        raise AssertionError(name)
    return mark, mask


def make_patch(name, shape, seed, option):
    """A generated patch, or an image file with its mask_<file> (first channel / 255) or the non-black rule."""
    if name in GENERATED:
        mark, mask = generated_patch(name, shape, seed)
        return mark, mask, {"name": name, "origin": "generated", "key": f"adaptive_patch:{name}", "patch_seed": seed}
    path = Path(name)
    if not path.is_file():
        raise UserError(f"{option}: {name!r} is neither a generated patch ({', '.join(GENERATED)}) nor an image file")
    mark = load_image_pattern(path, shape)
    mask_path = path.with_name(f"mask_{path.name}")
    origin = {"name": name, "origin": "file", "file_sha256": file_sha256(path)}
    if mask_path.is_file():
        mask = load_image_pattern(mask_path, (3, *shape[1:]))[0].to(torch.float32) / 255
        origin["mask"] = {"file": str(mask_path), "file_sha256": file_sha256(mask_path)}
    else:
        mask, origin["mask"] = (mark > 0).any(0).to(torch.float32), "non_black"
    return mark, mask, origin


def rank_blocks(n: int, k: int) -> torch.Tensor:
    """Patch of each rank r < n: floor(r k / n), the authors' contiguous blocks in integers (150, 4: 38, 37, 38, 37)."""
    return torch.arange(n, dtype=torch.int64) * k // max(n, 1)


@register_trigger
@dataclass
class AdaptivePatchTrigger:
    """Training images (payload via apply, cover via cross): their assigned training patch at its opacity. Poisoned
    test images: every test patch in list order, quantised once. Cover test images: training patch
    floor(rank k / N_T) at its opacity. planted_*: the assignment made by assign() from the plan."""
    train_marks: torch.Tensor    # uint8 (k, C, H, W)
    train_masks: torch.Tensor    # float32 (k, H, W)
    train_alphas: list
    test_marks: torch.Tensor
    test_masks: torch.Tensor
    test_alphas: list
    seed: int                    # random_seed (tells a cross call's split)
    planted_index: torch.Tensor = None   # int64, sorted payload + cover
    planted_patch: torch.Tensor = None   # int8
    planted_cover: torch.Tensor = None   # int8: 1 for a cover sample
    kind: ClassVar[str] = "adaptive_patch"

    @staticmethod
    def weights(masks, alphas):
        """fl32(fl32(a) * S) per patch, (k, 1, H, W)."""
        return torch.stack([fl32(a) * s for a, s in zip(alphas, masks)])[:, None]

    def assign(self, payload, cover):
        k = len(self.train_alphas)
        order = torch.cat([payload, cover]).argsort()
        self.planted_index = torch.cat([payload, cover])[order]
        self.planted_patch = torch.cat([rank_blocks(len(payload), k), rank_blocks(len(cover), k)])[order].to(torch.int8)
        self.planted_cover = torch.cat([torch.zeros(len(payload)), torch.ones(len(cover))])[order].to(torch.int8)

    def one_patch(self, x, pid):
        w = self.weights(self.train_masks, self.train_alphas)
        return insert(x.cpu(), self.train_marks[pid], w[pid]).to(x.device)

    def planted(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.int64).cpu()
        keys = self.planted_index if self.planted_index is not None else torch.empty(0, dtype=torch.int64)
        pos = torch.searchsorted(keys, idx).clamp(max=max(len(keys) - 1, 0))
        if len(idx) and (len(keys) == 0 or not torch.equal(keys[pos], idx)):
            raise ValueError("some training indices were not planted: the plan assigns each payload and cover "
                             "sample its patch (AdaptivePatchTrigger.assign)")
        return self.planted_patch[pos].to(torch.int64)

    def apply(self, x, idx=None, gen=None, train=True):
        if x.dtype != torch.uint8:
            raise TypeError("triggers act on uint8 images")
        if train:
            return self.one_patch(x, self.planted(idx))
        w = self.weights(self.test_masks, self.test_alphas)
        out = torch.empty_like(x, device="cpu")
        for i in range(0, len(x), CHUNK):   # every test patch in list order on float32, one quantisation
            v = to_unit(x[i:i + CHUNK].cpu())
            for mark, wl in zip(self.test_marks, w):
                v = blend_step(v, to_unit(mark), wl)
            out[i:i + CHUNK] = quantise(v)
        return out.to(x.device)

    def cross(self, x_split, idx, pool, gen, train=True):
        if train:
            return self.one_patch(x_split[idx], self.planted(idx))
        rank = torch.searchsorted(torch.as_tensor(pool).sort().values, torch.as_tensor(idx))
        return self.one_patch(x_split[idx], rank * len(self.train_alphas) // len(pool))

    @property
    def pattern(self):
        """trigger_pattern.png: the training patches and the composed test trigger side by side on black."""
        black = torch.zeros_like(self.train_marks[:1])
        shown = [(m * (s > 0)).to(torch.uint8) for m, s in zip(self.train_marks, self.train_masks)]
        return torch.cat([*shown, self.apply(black, train=False)[0]], dim=2)

    def spec(self):
        return {"kind": self.kind, "train_alphas": list(self.train_alphas), "test_alphas": list(self.test_alphas),
                "seed": self.seed, "assignment": "rank_blocks", "quantisation": QUANTISATION,
                "train_support_pixels": [int((s > 0).sum()) for s in self.train_masks],
                "test_support_pixels": [int((s > 0).sum()) for s in self.test_masks],
                "marks_sha256": tensor_sha256(torch.cat([self.train_marks.flatten(), self.test_marks.flatten()]))}

    def tensors(self):
        out = {f"train_mark_{j}": m for j, m in enumerate(self.train_marks)}
        out.update({f"train_mask_{j}": s for j, s in enumerate(self.train_masks)})
        out.update({f"test_mark_{j}": m for j, m in enumerate(self.test_marks)})
        out.update({f"test_mask_{j}": s for j, s in enumerate(self.test_masks)})
        if self.planted_index is not None:
            out.update(planted_index=self.planted_index, planted_patch=self.planted_patch,
                       planted_cover=self.planted_cover)
        return out

    @classmethod
    def from_record(cls, spec, tensors):
        k, kt = len(spec["train_alphas"]), len(spec["test_alphas"])
        stack = lambda name, n: torch.stack([tensors[f"{name}_{j}"] for j in range(n)])   # noqa: E731
        t = cls(stack("train_mark", k), stack("train_mask", k), spec["train_alphas"], stack("test_mark", kt),
                stack("test_mask", kt), spec["test_alphas"], spec["seed"])
        if "planted_index" in tensors:
            idx, cover = tensors["planted_index"], tensors["planted_cover"].bool()
            t.assign(idx[~cover], idx[cover])
            if not (torch.equal(t.planted_index, idx) and torch.equal(t.planted_patch, tensors["planted_patch"])):
                raise UserError("the patch assignment in trigger.safetensors is not the rank-block rule's; the record "
                                "was altered: make it again")
        return t


def make_trigger(cfg):
    shape = dataset_info(cfg["dataset"]).shape
    lists = {}
    for part in ("train", "test"):
        names, alphas = cfg[f"{part}_trigger_names"], cfg[f"{part}_trigger_alphas"]
        if len(names) != len(alphas):
            raise UserError(f"{part}_trigger_names lists {len(names)} patches but {part}_trigger_alphas {len(alphas)} "
                            "opacities; give one opacity per patch")
        made = [make_patch(n, shape, cfg["patch_seed"], f"{part}_trigger_names") for n in names]
        lists[part] = (torch.stack([m for m, _, _ in made]), torch.stack([s for _, s, _ in made]),
                       [{**o, "alpha": a} for (_, _, o), a in zip(made, alphas)])
    (trm, trs, tro), (tem, tes, teo) = lists["train"], lists["test"]
    trigger = AdaptivePatchTrigger(trm, trs, cfg["train_trigger_alphas"], tem, tes, cfg["test_trigger_alphas"],
                                   cfg["random_seed"])
    return trigger, {"train": tro, "test": teo}


def make_plan(y, k, cfg, trigger, meta):
    plan = plan_adaptive(y, k, cfg, meta)
    trigger.assign(plan.poison_indices, plan.cross_indices)
    for part, n in (("payload", len(plan.poison_indices)), ("cover", len(plan.cross_indices))):
        meta[f"{part}_per_patch"] = torch.bincount(rank_blocks(n, len(cfg["train_trigger_alphas"])),
                                                   minlength=len(cfg["train_trigger_alphas"])).tolist()
    return plan


def patch_diagnostics(ctx, trigger):
    """After the last epoch (spec §5.5 item 4): ASR of each training patch alone on the non-target test images, at
    its training opacity and at opacity 1."""
    t, data = ctx.cfg["attack_target"], ctx.data
    x = data.x_test[data.y_test != t]
    out = {}
    for j, (mark, mask, a) in enumerate(zip(trigger.train_marks, trigger.train_masks, trigger.train_alphas)):
        for tag, alpha in (("train", a), ("full", 1.0)):
            xp = insert(x, mark, fl32(alpha) * mask).to(ctx.x_train.device)
            pred, _ = predict(ctx.model, xp, ctx.precision, ctx.cfg["eval_batch_size"])
            out[f"test_asr_{tag}_patch_{j}"] = (pred == t).float().mean().item()
    return out


def training(ctx, trigger):
    """The standard epoch; test_cross_asr every evaluation, the per-patch ASRs once after the last epoch."""
    epoch = {}

    def evaluate():
        extra = patch_diagnostics(ctx, trigger) if epoch.get("e") == ctx.cfg["epochs"] else {}
        return {**cover_test_asr(ctx), **extra}
    return Training(epoch_start=lambda _, e: epoch.update(e=e), evaluate=evaluate, show=("test_cross_asr",))


@register("adaptive_patch", "attack", paper="Qi et al., ICLR 2023", needs=("dataset",), options=OPTIONS,
          summary="Adaptive-Patch: one of 4 faint patches per planted image, cover samples with true labels, patches "
                  "combined at opacity 1 at test time")
def configure(argv=None):
    """Every setting resolved and checked and the trigger made, nothing written (the sweep checks its jobs with this)."""
    cfg, args = attack_config("adaptive_patch", OPTIONS, argv, __doc__)
    refuse_all2all(cfg, "Adaptive-Patch")
    return cfg, args, *make_trigger(cfg)


def main(argv=None):
    cfg, args, trigger, meta = configure(argv)
    return run_attack("adaptive_patch", cfg, args, trigger, meta, training=lambda ctx: training(ctx, trigger),
                      extra_config={"deviations": recipe_deviations(args)},
                      plan=lambda y, k: make_plan(y, k, cfg, trigger, meta))


if __name__ == "__main__":
    run_main(main)
