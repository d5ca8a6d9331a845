"""Adaptive-Blend (Qi, Xie, Li, Mahloujifar, Mittal, "Revisiting the Assumption of Latent Separability for Backdoor
Defenses", ICLR 2023; spec: docs/specs/adaptive_blend.md). A blended backdoor built to defeat latent-separation
defenses: the pattern is cut into a g x g grid of pieces and each planted training image shows only a random half
of them, faintly (alpha 0.15); as many "regularisation" (cover) images carry such a partial trigger but keep their
true label, so the model cannot learn "any trace of the pattern -> target". At test time the whole pattern is
blended at the stronger test_alpha 0.2, and only that crosses the boundary. The attacker supplies data only:
training is the standard recipe.

    python attack/adaptive_blend.py --save_folder_name adaptive_blend_demo

Payload = the plan's poison_indices (label t); cover = its cross_indices (true labels, images altered through
trigger.cross); the cover test set (every test image with a training-style partial trigger) is the toolkit's cross
test set, logged as test_cross_acc, plus test_cross_asr (non-target images sent to t by a partial trigger).
"""
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from utils.adaptive_triggers import QUANTISATION, cover_options, cover_test_asr, fl32, insert, \
    plan_adaptive, recipe_deviations, refuse_all2all
from utils.attack import Training, attack_config, run_attack
from utils.config import Opt, in_range
from utils.errors import UserError, run_main
from utils.registry import register
from utils.seeding import generator
from utils.poison import tensor_sha256
from utils.trigger_options import blend_pattern
from utils.triggers import register_trigger

OPTIONS = [
    *cover_options(0.003),
    Opt("alpha", float, 0.15, "training opacity of the visible pieces (payload and cover)", check=in_range(0, 1)),
    Opt("test_alpha", float, 0.2, "test opacity of the whole pattern", check=in_range(0, 1)),
    Opt("pieces", int, 16, "number of pieces, a perfect square g^2 (g divides the image's height and width)",
        check=in_range(1, 25)),
    Opt("mask_rate", float, 0.5, "fraction of the pieces hidden in each planted image (round(mask_rate * pieces) "
        "of them, Python's rounding)", check=in_range(0, 1)),
    Opt("blend_pattern_seed", int, 0, "seed of the noise pattern (independent of random_seed)", check=in_range(0)),
    Opt("attack_trigger_img_path", str, None, "an image file to blend instead of the noise pattern"),
]

KEY = "adaptive_blend_pieces:{split}:{index}"


def piece_geometry(shape, pieces, mask_rate):
    """(g, s_h, s_w, m), or the error saying what is allowed (adaptive_blend.md §4, §5.1)."""
    _, h, w = shape
    g = math.isqrt(pieces)
    if g * g != pieces:
        raise UserError(f"pieces = {pieces} is not a perfect square; allowed: 1, 4, 9, 16, 25")
    if h % g or w % g:
        raise UserError(f"pieces = {pieces} cuts the image into a {g}x{g} grid, but the {h}x{w} image is not divisible "
                        f"by {g}; choose pieces whose root divides both sides")
    m = round(mask_rate * pieces)   # half to even, as the authors' round()
    if m >= pieces:
        raise UserError(f"mask_rate = {mask_rate} hides {m} of {pieces} pieces: no piece would be planted; "
                        "allowed: mask_rate < (pieces - 0.5) / pieces")
    return g, h // g, w // g, m


@register_trigger
@dataclass
class AdaptiveBlendTrigger:
    """Training images (payload via apply, cover via cross): the pattern on the visible pieces of the image's own
    mask, opacity alpha. Poisoned test images: the whole pattern at test_alpha. Cover test images (cross on the
    test split): a mask of their own, opacity alpha. The mask of image i is the last g^2 - m entries of
    randperm(g^2) on generator(seed, KEY(split, i)): a function of the seed and the index only."""
    pattern: torch.Tensor                 # uint8 (C, H, W)
    alpha: float
    test_alpha: float
    pieces: int
    mask_rate: float
    seed: int                             # random_seed: the piece masks' generators
    kind: ClassVar[str] = "adaptive_blend"
    bits: dict = field(default_factory=lambda: {"train": {}, "test": {}}, repr=False)   # index -> visible bitmask

    def __post_init__(self):
        self.g, self.s_h, self.s_w, self.m = piece_geometry(tuple(self.pattern.shape), self.pieces, self.mask_rate)

    def visible(self, idx, split) -> torch.Tensor:
        """int64 bitmask of the visible pieces of each index (bit q = piece q, row-major); one generator per image,
        cached so that tensors() stores exactly what was planted."""
        cache, n = self.bits[split], self.pieces
        for i in torch.as_tensor(idx, dtype=torch.int64).tolist():
            if i not in cache:
                perm = torch.randperm(n, generator=generator(self.seed, KEY.format(split=split, index=i)))
                cache[i] = int((1 << perm[self.m:]).sum())
        return torch.tensor([cache[i] for i in torch.as_tensor(idx).tolist()], dtype=torch.int64)

    def masks(self, bits: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) float32 0/1 piece masks from the bitmasks, batched."""
        on = (bits[:, None] >> torch.arange(self.pieces)) & 1
        grid = on.view(-1, 1, self.g, self.g).to(torch.float32)
        return grid.repeat_interleave(self.s_h, 2).repeat_interleave(self.s_w, 3)

    def partial(self, x, idx, split):
        return insert(x.cpu(), self.pattern, fl32(self.alpha) * self.masks(self.visible(idx, split))).to(x.device)

    def apply(self, x, idx=None, gen=None, train=True):
        if x.dtype != torch.uint8:
            raise TypeError("triggers act on uint8 images")
        if train:
            return self.partial(x, idx, "train")
        return insert(x.cpu(), self.pattern, fl32(self.test_alpha)).to(x.device)   # M = 1: the whole pattern

    def cross(self, x_split, idx, pool, gen, train=True):
        """Cover images of x_split[idx]: training masks on the training split, test masks on the test split."""
        return self.partial(x_split[idx], idx, "train" if train else "test")

    def spec(self):
        return {"kind": self.kind, "alpha": self.alpha, "test_alpha": self.test_alpha, "pieces": self.pieces,
                "mask_rate": self.mask_rate, "g": self.g, "piece_size": [self.s_h, self.s_w], "m": self.m,
                "mask_rule": {"name": "randperm_per_index", "seed": self.seed, "key": KEY,
                              "visible": "last pieces - m entries"},
                "quantisation": QUANTISATION, "pattern_sha256": tensor_sha256(self.pattern)}

    def tensors(self):
        train = torch.tensor(sorted(self.bits["train"]), dtype=torch.int64)
        test = torch.arange(len(self.bits["test"]))
        return {"pattern": self.pattern, "visible_train_index": train,
                "visible_train": self.visible(train, "train").to(torch.int32),
                "visible_test": self.visible(test, "test").to(torch.int32)}

    @classmethod
    def from_record(cls, spec, tensors):
        t = cls(tensors["pattern"], spec["alpha"], spec["test_alpha"], spec["pieces"], spec["mask_rate"],
                spec["mask_rule"]["seed"])
        for split, idx, stored in (("train", tensors["visible_train_index"], tensors["visible_train"]),
                                   ("test", torch.arange(len(tensors["visible_test"])), tensors["visible_test"])):
            if not torch.equal(t.visible(idx, split).to(torch.int32), stored):
                raise UserError(f"the {split} piece masks in trigger.safetensors differ from the ones the rule gives "
                                f"(randperm on generator(seed, '{KEY}')): torch's random-number stream changed, or the "
                                "record was altered; make the record again")
        return t


def make_trigger(cfg):
    pattern, meta = blend_pattern(cfg)
    trigger = AdaptiveBlendTrigger(pattern, cfg["alpha"], cfg["test_alpha"], cfg["pieces"], cfg["mask_rate"],
                                   cfg["random_seed"])
    return trigger, meta


def training(ctx):
    """The standard epoch (the attacker controls data only), plus the partial-trigger ASR of the cover test set."""
    return Training(evaluate=lambda: cover_test_asr(ctx), show=("test_cross_asr",))


@register("adaptive_blend", "attack", paper="Qi et al., ICLR 2023", needs=("dataset",), options=OPTIONS,
          summary="Adaptive-Blend: half of a pieced blend pattern at 0.15, cover samples with true labels, whole "
                  "pattern at 0.2 at test time")
def configure(argv=None):
    """Every setting resolved and checked and the trigger made, nothing written (the sweep checks its jobs with this)."""
    cfg, args = attack_config("adaptive_blend", OPTIONS, argv, __doc__)
    refuse_all2all(cfg, "Adaptive-Blend")
    return cfg, args, *make_trigger(cfg)


def main(argv=None):
    cfg, args, trigger, meta = configure(argv)
    return run_attack("adaptive_blend", cfg, args, trigger, meta, training=training,
                      extra_config={"deviations": recipe_deviations(args)},
                      plan=lambda y, k: plan_adaptive(y, k, cfg, meta))


if __name__ == "__main__":
    run_main(main)
