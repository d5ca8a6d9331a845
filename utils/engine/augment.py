"""Batched training augmentation on tensors (no per-image loop), and uint8 -> [0, 1] floats. The random draws come
from CPU generators (the same stream on every device) and reach the data's device without a host sync."""
import math

import torch
import torch.nn.functional as F

from utils.engine.device import to_device


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, padding: int = 4, flip: bool = False) -> torch.Tensor:
    """RandomCrop(H x W, padding, zero fill) and optionally RandomHorizontalFlip(0.5), independently per sample,
    on a whole float batch. Equivalent to the per-image torchvision transforms, without any per-image loop."""
    b, c, h, w = x.shape
    if padding > 0:
        off = to_device(torch.randint(0, 2 * padding + 1, (2, b), generator=gen, device=gen.device), x.device)
        xp = F.pad(x, (padding, padding, padding, padding))
        rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = xp[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
               rows, cols]
    if flip:
        m = to_device(torch.rand(b, generator=gen, device=gen.device) < 0.5, x.device)
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def cutout_keep(h, w, rows, cols, length):
    """(B, H, W) mask, 0 in each image's hole: rows max(0, r - half) .. min(H, r + half) - 1, the same for columns,
    half = length // 2 (the authors' Cutout for ABL and NAD: length 3 zeroes a 2 x 2 square)."""
    half = length // 2
    r, c = torch.arange(h, device=rows.device), torch.arange(w, device=rows.device)
    in_r = (r[None] >= (rows - half).clamp(min=0)[:, None]) & (r[None] < (rows + half).clamp(max=h)[:, None])
    in_c = (c[None] >= (cols - half).clamp(min=0)[:, None]) & (c[None] < (cols + half).clamp(max=w)[:, None])
    return ~(in_r[:, :, None] & in_c[:, None, :])


def cutout(x: torch.Tensor, length: int, gen: torch.Generator) -> torch.Tensor:
    """Cutout on a float batch: one hole per image, its centre row then column drawn from gen."""
    b, _, h, w = x.shape
    rows = to_device(torch.randint(0, h, (b,), generator=gen), x.device)
    cols = to_device(torch.randint(0, w, (b,), generator=gen), x.device)
    return x * cutout_keep(h, w, rows, cols, length)[:, None].to(x.dtype)


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255)


def uniform(gen, n, device):
    """n draws of U(0, 1) from gen, on the data's device."""
    return to_device(torch.rand(n, generator=gen, device=gen.device), device)


def rotate_by(x, angle, mode="nearest"):
    """Rotate each image by its angle (radians, counter-clockwise) about the centre: nearest neighbour (or
    bilinear), zero fill."""
    _, _, h, w = x.shape
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    # the rotation in pixel units, written in affine_grid's normalised coordinates (aspect ratio kept)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def random_rotation(x, gen, p, degrees, mode="nearest"):
    """RandomRotation(+-degrees) with probability p per sample. Which samples rotate is decided on the CPU, where
    the draws are made, so the device never has to report it."""
    chosen = uniform(gen, len(x), "cpu") < p
    angle = (uniform(gen, len(x), "cpu") * 2 - 1) * math.radians(degrees)
    if not chosen.any():
        return x
    pick = chosen.nonzero().squeeze(1)
    angle, rows = to_device(angle[pick], x.device), to_device(pick, x.device)
    x = x.clone()
    x[rows] = rotate_by(x[rows], angle, mode)
    return x


def random_crop_prob(x, gen, p, padding):
    """RandomCrop(H x W, zero padding) with probability p per sample (the uncropped samples unchanged)."""
    chosen = uniform(gen, len(x), x.device) < p
    return torch.where(chosen[:, None, None, None], random_crop_flip(x, gen, padding), x)


def post_tensor_transform(x, gen, padding, degrees, flip, p_crop=0.8, p_rotate=0.5):
    """The augmentation of the WaNet release that BppAttack inherits, on the assembled float batch, poisoned
    samples included: a random crop (zero padding) with probability p_crop, then a rotation by U(-degrees,
    degrees), bilinear, zero fill, with probability p_rotate, then (cifar10) a horizontal flip with probability
    0.5; every coin and parameter drawn per sample (specs wanet.md §5.5, bpp.md §5.5)."""
    if padding > 0:
        x = random_crop_prob(x, gen, p_crop, padding)
    if degrees > 0:
        x = random_rotation(x, gen, p_rotate, degrees, mode="bilinear")
    if flip:
        x = random_crop_flip(x, gen, 0, True)
    return x
