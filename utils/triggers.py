"""Triggers as pure functions on whole uint8 batches (N, C, H, W), 0-255 scale (conventions §6).

BadNets: x' = x where P = 0, P where P > 0.
Blended: x' = trunc(clip((1 - a) x + a P, 0, 255)), computed in float64 as numpy does on uint8 arrays.
"""
import hashlib
import io
from dataclasses import dataclass
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


@dataclass
class Trigger:
    """kind 'patch' (BadNets) or 'blend'; pattern is uint8 (C, H, W)."""
    kind: str
    pattern: torch.Tensor
    alpha_train: float = 0.2
    alpha_test: float = 0.2

    def apply(self, x: torch.Tensor, train: bool = True) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError("triggers act on uint8 images")
        p = self.pattern.to(x.device)
        if self.kind == "patch":
            return torch.where(p > 0, p, x)
        a = self.alpha_train if train else self.alpha_test
        out = torch.empty_like(x)
        for i in range(0, len(x), 4096):  # float64 in chunks keeps memory bounded on large sets
            xb = x[i:i + 4096].to(torch.float64)
            out[i:i + 4096] = ((1 - a) * xb + a * p.to(torch.float64)).clamp_(0, 255).to(torch.uint8)
        return out

    def spec(self) -> dict:
        d = {"kind": self.kind, "pattern_file": "trigger_pattern.png",
             "pattern_sha256": hashlib.sha256(self.pattern.numpy().tobytes()).hexdigest()}
        if self.kind == "blend":
            d.update(alpha_train=self.alpha_train, alpha_test=self.alpha_test)
        return d

    @classmethod
    def from_spec(cls, spec: dict, pattern: torch.Tensor) -> "Trigger":
        if hashlib.sha256(pattern.numpy().tobytes()).hexdigest() != spec["pattern_sha256"]:
            raise UserError("trigger_pattern.png does not match the digest in poison.json; the record was altered")
        return cls(spec["kind"], pattern, spec.get("alpha_train", 0.2), spec.get("alpha_test", 0.2))
