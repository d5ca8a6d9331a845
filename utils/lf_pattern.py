"""LF's universal low-frequency pattern (docs/specs/lf.md §5.4-§5.6), as pure functions on a model and tensors: the
separable Gaussian low-pass filter S, the min-max normalisation N to [0, xi], targeted DeepFool on the logits, and
the universal-perturbation search with its stop rules. attack/lf.py draws the images, keeps the resource and logs.

Everything is float32 in pixel space ([0, 1] images, the pattern v in the same units), no autocast, no clipping of
x + v (as both originals): the search is bit-identical when repeated on the same machine and thread count.
"""
import io
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from utils.engine.epoch import progress
from utils.errors import UserError

COUNTS = ("updates", "skipped_fooled", "skipped_target", "not_converged", "degenerate")


# --- the filter S and the normalisation N (§5.4) -------------------------------------------------------------

def gaussian_kernel(sigma: float) -> torch.Tensor:
    """T = 5 sigma taps, w_k = exp(-(k - (T-1)/2)^2 / (2 sigma^2)) / sum, computed in float64, stored float32."""
    t = round(5 * sigma)
    k = np.arange(t, dtype=np.float64) - (t - 1) / 2
    w = np.exp(-k ** 2 / (2 * sigma ** 2))
    return torch.from_numpy((w / w.sum()).astype(np.float32))


def smooth(a: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """S(a) for a (C, H, W) or (N, C, H, W): zero padding ((T-1)//2 before, T//2 after, the originals' asymmetric
    'same' padding for even T), a valid correlation along the rows, then along the columns, each channel alone."""
    t = len(kernel)
    x = a.unsqueeze(0) if a.dim() == 3 else a
    c = x.shape[1]
    k = kernel.to(x.device, x.dtype)
    x = F.pad(x, ((t - 1) // 2, t // 2, (t - 1) // 2, t // 2))
    x = F.conv2d(x, k.view(1, 1, t, 1).expand(c, 1, t, 1), groups=c)
    x = F.conv2d(x, k.view(1, 1, 1, t).expand(c, 1, 1, t), groups=c)
    return x[0] if a.dim() == 3 else x


def normalise(a: torch.Tensor, xi: float):
    """N(a) = xi (a - min a) / (max a - min a), min and max over every channel and pixel: exactly 0 and fl32(xi) at
    the extremes (the same float32 difference is divided by itself). None when a is constant (0/0 would put NaN
    into v for good, spec §7 row 5)."""
    lo, hi = a.min(), a.max()
    if not bool(hi > lo):
        return None
    return (a - lo) / (hi - lo) * xi


# --- targeted DeepFool (§5.6) --------------------------------------------------------------------------------------

def targeted_deepfool(model, z0: torch.Tensor, target: int, overshoot: float, max_iter: int):
    """From z0 (C, H, W) towards class `target`: ((1 + eta) r, iterations, final label). The label l = y(z0) stays
    fixed for the whole run (the originals' I[0]); each step is one backward pass of f_t - f_l. A step that is not
    finite (zero gradient) adds nothing. Gradients are taken with respect to the input only."""
    scale = 1 + overshoot
    r = torch.zeros_like(z0)
    z, start, i = z0, None, 0
    while True:
        zz = z.detach().unsqueeze(0).requires_grad_(True)
        logits = model(zz)[0]
        label = int(logits.argmax())
        if start is None:
            start = label
        if label == target or i >= max_iter:
            return scale * r, i, label
        d = logits[target] - logits[start]
        g, = torch.autograd.grad(d, zz)
        g = g[0]
        step = d.detach().abs() / g.pow(2).sum() * g
        if bool(torch.isfinite(step).all()):
            r = r + step
        z = z0 + scale * r
        i += 1


def predict_labels(model, x: torch.Tensor, batch=256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


# --- the search (§5.5) ---------------------------------------------------------------------------------------------

@dataclass
class SearchSettings:
    target: int
    delta: float = 0.8              # stop once the fooling rate reaches 1 - delta
    max_passes: int = 50
    plateau_passes: int = 5
    plateau_tol: float = 0.01
    overshoot: float = 0.02
    max_iter_df: int = 200
    sigma: float = 6.0
    xi: float = 0.2
    keep: str = "last"              # or "best": the pass with the highest fooling rate, the later one on ties


@dataclass
class SearchResult:
    v: torch.Tensor                 # the pattern returned (keep rule), (C, H, W) float32 in [0, xi]
    rows: list                      # one dict per pass (passes.csv)
    stop_reason: str
    kept_pass: int
    counts: dict = field(default_factory=dict)   # summed over the passes


def stop_reason(history: list, s: SearchSettings):
    p, fr = len(history), history[-1]
    if fr >= 1 - s.delta:
        return "fooling_goal"
    last = history[-s.plateau_passes:]
    if p >= s.plateau_passes and max(last) - min(last) < s.plateau_tol:
        return "plateau"
    if p >= s.max_passes:
        return "max_passes"
    return None


def search_pattern(model, x_search: torch.Tensor, x_eval: torch.Tensor, s: SearchSettings, shuffle_gen,
                   log=print) -> SearchResult:
    """BackdoorBench's universal_perturbation with the fixes of spec §7: x_search (M, C, H, W) and x_eval (V, ...)
    float32 in [0, 1] on the model's device; shuffle_gen (CPU) orders each pass. The images are visited one at a
    time on purpose: every update of v changes the next image's starting point."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    kernel = gaussian_kernel(s.sigma).to(x_search.device)
    clean_search, clean_eval = predict_labels(model, x_search), predict_labels(model, x_eval)
    v = torch.zeros_like(x_search[0])
    history, rows, kept, best = [], [], v, -1.0
    while True:
        t0, p = time.time(), len(history) + 1
        counts, iters = dict.fromkeys(COUNTS, 0), []
        order = torch.randperm(len(x_search), generator=shuffle_gen).tolist()
        for j in progress(order, f"lf pass {p}"):
            z0 = x_search[j] + v
            if int(predict_labels(model, z0[None])[0]) != int(clean_search[j]):
                counts["skipped_fooled"] += 1
                continue
            r, i, end = targeted_deepfool(model, z0, s.target, s.overshoot, s.max_iter_df)
            iters.append(i)
            if i == 0:                  # already the target: r = 0 would only smooth v once more (§7 row 5)
                counts["skipped_target"] += 1
            elif end != s.target:       # converged <=> DeepFool ends on t (§7 row 6)
                counts["not_converged"] += 1
            else:
                new = normalise(smooth(v + smooth(r, kernel), kernel), s.xi)
                if new is None:
                    counts["degenerate"] += 1
                else:
                    v = new
                    counts["updates"] += 1
        pred = predict_labels(model, x_eval + v)
        fr = (pred != clean_eval).double().mean().item()
        history.append(fr)
        rows.append({"pass": p, "fooling_rate": fr, "targeted_rate": (pred == s.target).double().mean().item(),
                     **counts, "mean_df_iterations": float(np.mean(iters)) if iters else 0.0,
                     "v_l2": v.double().norm().item(), "seconds": round(time.time() - t0, 3)})
        log(f"lf pass {p}: fooling rate {fr:.4f}, targeted {rows[-1]['targeted_rate']:.4f}, "
            + ", ".join(f"{k} {counts[k]}" for k in COUNTS) + f", {rows[-1]['seconds']:.1f} s")
        if fr >= best:                  # >=: the later pass wins a tie
            best, kept, kept_pass = fr, v, p
        reason = stop_reason(history, s)
        if reason is not None:
            break
    if s.keep == "last":
        kept, kept_pass = v, p
    if not bool((kept != 0).any()):
        raise UserError(f"the LF search made no update in {p} passes (of {len(x_search)} search images: the clean "
                        f"model already predicts the target {s.target} for every one, or DeepFool never reached it "
                        f"within lf_max_iter_df {s.max_iter_df}); try more --lf_num_images, a larger "
                        "--lf_max_iter_df or another --resource_seed")
    total = {k: sum(r[k] for r in rows) for k in COUNTS}
    return SearchResult(kept, rows, reason, kept_pass, total)


# --- the picture -------------------------------------------------------------------------------------------------

def pattern_png(P: torch.Tensor, zoom=4) -> bytes:
    """P x 5 clipped to 0-255 beside the log magnitude of its 2-D DFT (channel mean, centred, scaled to 0-255),
    nearest-neighbour zoomed, lossless PNG."""
    from PIL import Image
    c = P.shape[0]
    bright = (P.double() * 5).clamp(0, 255).to(torch.uint8)
    mag = torch.fft.fftshift(torch.fft.fft2(P.double().mean(0))).abs().log1p()
    mag = (mag / mag.max().clamp_min(1e-12) * 255).to(torch.uint8).expand(c, -1, -1)
    gap = torch.full((c, P.shape[1], 2), 128, dtype=torch.uint8)
    a = torch.cat([bright, gap, mag], dim=2).numpy()
    im = Image.fromarray(a[0], "L") if c == 1 else Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)), "RGB")
    im = im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def taps(sigma: float):
    """5 sigma when it is an integer >= 2 (the window's length), else None."""
    t = 5 * sigma
    return round(t) if math.isclose(t, round(t), abs_tol=1e-9) and round(t) >= 2 else None
