"""Triggers: functions on whole uint8 batches (N, C, H, W), 0-255 scale (conventions §6), behind one protocol that
static patterns, warps and per-image generators all fit, and their patterns.

BadNets: x' = x where P = 0, P where P > 0.
Blended: x' = trunc(clip((1 - a) x + a P, 0, 255)), computed in float64 as numpy does on uint8 arrays.
Additive (SIG, LF): x' = trunc(clip(x + P, 0, 255)), P signed.
"""
import hashlib
import io
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError

POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left")


def badnet_pattern(shape, size=3, position="bottom_right", value=255) -> torch.Tensor:
    """All zeros except a size x size block of `value` in every channel; position is a corner name or (row, col)
    of the block's top-left pixel."""
    c, h, w = shape
    if not 1 <= size <= min(h, w):
        raise UserError(f"patch_size {size} does not fit a {h}x{w} image; allowed: 1..{min(h, w)}")
    if not 1 <= value <= 255:
        raise UserError(f"patch_value {value} out of range; allowed: 1..255 (0 would be no trigger at all)")
    if isinstance(position, str):
        if position not in POSITIONS:
            raise UserError(f"patch_position '{position}' unknown; allowed: {', '.join(POSITIONS)} or [row, col]")
        r = h - size if position.startswith("bottom") else 0
        col = w - size if position.endswith("right") else 0
    else:
        r, col = (int(v) for v in position)
        if not (0 <= r <= h - size and 0 <= col <= w - size):
            raise UserError(f"patch_position {[r, col]} puts a {size}x{size} patch outside the {h}x{w} image; "
                            f"rows 0..{h - size}, cols 0..{w - size} are allowed")
    p = torch.zeros(shape, dtype=torch.uint8)
    p[:, r:r + size, col:col + size] = value
    return p


def blend_noise_pattern(shape, seed=0) -> torch.Tensor:
    """The random-noise Blended pattern: one randint call on a dedicated generator (independent of random_seed)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 256, tuple(shape), generator=g).to(torch.uint8)


def load_image_pattern(path, shape) -> torch.Tensor:
    """Any image file as a uint8 (C, H, W) pattern: converted to the dataset's channels, resized bilinearly."""
    from PIL import Image
    path = Path(path)
    if not path.is_file():
        raise UserError(f"trigger image {path} not found; pass the path of an existing image file")
    c, h, w = shape
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if c == 3 else "L")
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            a = np.array(im, dtype=np.uint8)
    except Exception as e:
        raise UserError(f"cannot read trigger image {path}: {e}") from None
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pattern_png_bytes(pattern: torch.Tensor) -> bytes:
    from PIL import Image
    a = pattern.numpy()
    im = Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def read_pattern_png(path) -> torch.Tensor:
    from PIL import Image
    try:
        with Image.open(path) as im:
            a = np.array(im, dtype=np.uint8)
    except Exception as e:  # truncated or not an image
        raise UserError(f"record file {path} is not a readable PNG ({type(e).__name__}); the file is damaged: make the "
                        "record again") from None
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


# --- the trigger protocol ---------------------------------------------------------------------------------------
#
# A trigger is any object with
#     kind                                   a name, the key of TRIGGER_KINDS
#     apply(x, idx, gen, train) -> x'        x: uint8 (N, C, H, W); idx: the samples' indices in their split (a
#                                            per-image trigger uses them); gen: a torch.Generator for a trigger
#                                            that draws at random; train: training or test images
#     spec() -> dict                         its parameters, JSON (poison.json's "trigger")
#     tensors() -> {name: tensor}            its state (patterns, warp grids, a small network's weights), saved to
#                                            trigger.safetensors: tensors only, never a pickled object
#     from_record(spec, tensors) (classmethod) rebuilds it bit for bit
# and, for an attack with cross samples (true label kept, image altered: WaNet's noise warps, BppAttack's negatives,
# Input-Aware's cross triggers, the adaptive attacks' regularisation samples),
#     cross(x_split, idx, pool, gen, train) -> x'   x_split: the whole clean split (uint8); the images of idx
#                                            through the cross transform; pool: the indices partners or sources
#                                            may come from; train: the training split or the test split
# and registers its class with @register_trigger. Static patterns live here; an attack whose trigger is its own
# (a warp, a generator network) declares the class in its own file.

TRIGGER_KINDS: dict = {}


def register_trigger(cls):
    TRIGGER_KINDS[cls.kind] = cls
    return cls


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def _check_uint8(x):
    if x.dtype != torch.uint8:
        raise TypeError("triggers act on uint8 images")


@register_trigger
@dataclass
class PatchTrigger:
    """BadNets: x' = x where P = 0, P where P > 0; pattern uint8 (C, H, W)."""
    pattern: torch.Tensor
    kind: ClassVar[str] = "patch"

    def apply(self, x, idx=None, gen=None, train=True):
        _check_uint8(x)
        p = self.pattern.to(x.device)
        return torch.where(p > 0, p, x)

    def spec(self):
        return {"kind": self.kind, "pattern_sha256": _sha256(self.pattern)}

    def tensors(self):
        return {"pattern": self.pattern}

    @classmethod
    def from_record(cls, spec, tensors):
        return cls(tensors["pattern"])


def blend(x: torch.Tensor, p: torch.Tensor, alpha: float) -> torch.Tensor:
    """trunc(clip((1 - a) x + a p, 0, 255)) in float64, as numpy does on uint8 arrays, in chunks (bounded memory)."""
    out = torch.empty_like(x)
    for i in range(0, len(x), 4096):
        xb = x[i:i + 4096].to(torch.float64)
        out[i:i + 4096] = ((1 - alpha) * xb + alpha * p.to(torch.float64)).clamp_(0, 255).to(torch.uint8)
    return out


@register_trigger
@dataclass
class BlendTrigger:
    """Blended: x' = trunc(clip((1 - a) x + a P, 0, 255)), a = alpha_train or alpha_test."""
    pattern: torch.Tensor
    alpha_train: float = 0.2
    alpha_test: float = 0.2
    kind: ClassVar[str] = "blend"

    def apply(self, x, idx=None, gen=None, train=True):
        _check_uint8(x)
        return blend(x, self.pattern.to(x.device), self.alpha_train if train else self.alpha_test)

    def spec(self):
        return {"kind": self.kind, "pattern_sha256": _sha256(self.pattern), "alpha_train": self.alpha_train,
                "alpha_test": self.alpha_test}

    def tensors(self):
        return {"pattern": self.pattern}

    @classmethod
    def from_record(cls, spec, tensors):
        return cls(tensors["pattern"], spec["alpha_train"], spec["alpha_test"])


@register_trigger
@dataclass
class AdditiveTrigger:
    """x' = trunc(clip(x + P, 0, 255)) with a signed float pattern P (C, H, W) in 0-255 units, one for training and
    one for test images (SIG's sinusoid, low-frequency patterns). Computed in float64, as numpy on uint8 arrays."""
    pattern_train: torch.Tensor
    pattern_test: torch.Tensor
    kind: ClassVar[str] = "additive"

    def apply(self, x, idx=None, gen=None, train=True):
        _check_uint8(x)
        p = (self.pattern_train if train else self.pattern_test).to(x.device, torch.float64)
        out = torch.empty_like(x)
        for i in range(0, len(x), 4096):
            out[i:i + 4096] = (x[i:i + 4096].to(torch.float64) + p).clamp_(0, 255).to(torch.uint8)
        return out

    def spec(self):
        return {"kind": self.kind, "pattern_train_sha256": _sha256(self.pattern_train),
                "pattern_test_sha256": _sha256(self.pattern_test)}

    def tensors(self):
        return {"pattern_train": self.pattern_train, "pattern_test": self.pattern_test}

    @classmethod
    def from_record(cls, spec, tensors):
        return cls(tensors["pattern_train"], tensors["pattern_test"])


@register_trigger
@dataclass
class StoredTrigger:
    """Poisoned images stored verbatim, by index (a record imported from another toolkit, whose trigger cannot be
    rebuilt from a spec): apply returns the stored image of each index, for the training or the test split."""
    train_indices: torch.Tensor     # int64, sorted
    train_images: torch.Tensor      # uint8 (n, C, H, W)
    test_indices: torch.Tensor
    test_images: torch.Tensor
    kind: ClassVar[str] = "stored"

    def apply(self, x, idx=None, gen=None, train=True):
        _check_uint8(x)
        keys, images = (self.train_indices, self.train_images) if train else (self.test_indices, self.test_images)
        idx = torch.as_tensor(idx, dtype=torch.int64).cpu()
        pos = torch.searchsorted(keys, idx).clamp(max=max(len(keys) - 1, 0))
        if len(idx) and (len(keys) == 0 or not torch.equal(keys[pos], idx)):
            raise ValueError(f"the record stores no poisoned {'training' if train else 'test'} image for some of "
                             "these indices")
        return images[pos].to(x.device)

    def spec(self):
        return {"kind": self.kind, "n_train": len(self.train_indices), "n_test": len(self.test_indices),
                "images_sha256": _sha256(torch.cat([self.train_images.flatten(), self.test_images.flatten()]))}

    def tensors(self):
        return {"train_indices": self.train_indices, "train_images": self.train_images,
                "test_indices": self.test_indices, "test_images": self.test_images}

    @classmethod
    def from_record(cls, spec, tensors):
        return cls(tensors["train_indices"], tensors["train_images"], tensors["test_indices"], tensors["test_images"])


# --- a trigger in the record ---------------------------------------------------------------------------------------

def trigger_file_bytes(trigger) -> bytes:
    from safetensors.torch import save
    # a copy of each: safetensors refuses tensors that share memory (one pattern for training and test)
    return save({k: v.detach().cpu().clone().contiguous() for k, v in trigger.tensors().items()})


def trigger_from_record(spec: dict, tensor_bytes: bytes, where):
    """Rebuild a trigger from poison.json's spec and trigger.safetensors' bytes, checked against the stored digest."""
    from safetensors.torch import load
    if hashlib.sha256(tensor_bytes).hexdigest() != spec.get("tensors_sha256"):
        raise UserError(f"{where} does not match the digest in poison.json; the record was altered: make it again")
    kind = spec.get("kind")
    if kind not in TRIGGER_KINDS:
        from utils.registry import discover
        discover()   # a trigger kind declared by an attack's own file
    if kind not in TRIGGER_KINDS:
        raise UserError(f"{where}: trigger kind {kind!r} is unknown to this toolkit (known: {', '.join(TRIGGER_KINDS)})")
    try:
        return TRIGGER_KINDS[kind].from_record(spec, load(tensor_bytes))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{where}: cannot rebuild the {kind} trigger ({type(e).__name__}: {e}); the record is "
                        "damaged: make it again") from None


def legacy_trigger(spec: dict, pattern: torch.Tensor):
    """Records of format version 1: the pattern from trigger_pattern.png, kind patch or blend."""
    if hashlib.sha256(pattern.numpy().tobytes()).hexdigest() != spec.get("pattern_sha256"):
        raise UserError("trigger_pattern.png does not match the digest in poison.json; the record was altered")
    if spec.get("kind") == "patch":
        return PatchTrigger(pattern)
    if spec.get("kind") == "blend":
        return BlendTrigger(pattern, spec.get("alpha_train", 0.2), spec.get("alpha_test", 0.2))
    raise UserError(f"trigger kind {spec.get('kind')!r} in a format-1 record; only patch and blend existed then")
