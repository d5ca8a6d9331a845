"""A StegaStamp-style steganography pair (Tancik et al., CVPR 2020, as BackdoorBench's port; docs/specs/ssba.md §5):
an encoder E(b, x) that hides a bit string b in an image x, a decoder D that reads it back, their training on
tensors, the BCH string of a secret (§5.2), and the canonical float64 encoding that makes poisoned images bit for
bit (§5.6).

- BCH over GF(2^7), primitive polynomial x^7 + x^3 + 1 (the originals' `137`), t = 5 for 100-bit strings (a 7-byte
  secret) or t = 2 for 50 bits (4 bytes); written from the definition, checked against bchlib 2.1.3's ECC bytes.
- Images are zero-padded to R = 32 * ceil(H / 32) (28 -> 32, 2 px each side) and cropped back, so the U-Net of
  BackdoorBench's port works at any size and for C channels; no normalisation layer anywhere, so each image's
  encoding is independent of its batch companions.
"""
import copy
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.engine.augment import to_unit
from utils.engine.device import to_device
from utils.engine.epoch import progress
from utils.engine.optim import fused
from utils.errors import UserError
from utils.seeding import derive_seed, generator

# --- the string b* (spec §5.2) ---------------------------------------------------------------------------------

GF_M, PRIM_POLY = 7, 0x89
BCH_T = {100: 5, 50: 2}             # string length L -> errors corrected
SECRET_BYTES = {100: 7, 50: 4}      # L = data bytes * 8 + parity bytes * 8 + padding


def _gf_tables():
    exp, a = [], 1
    for _ in range((1 << GF_M) - 1):
        exp.append(a)
        a <<= 1
        if a >> GF_M:
            a ^= PRIM_POLY
    return exp, {v: i for i, v in enumerate(exp)}


def _gf_mul(a, b, exp, log):
    return 0 if a == 0 or b == 0 else exp[(log[a] + log[b]) % len(exp)]


def bch_generator(t: int) -> int:
    """g(x) = lcm of the minimal polynomials of alpha^1..alpha^2t, as an int (bit k = coefficient of x^k)."""
    exp, log = _gf_tables()
    n, g, seen = len(exp), 1, set()
    for i in range(1, 2 * t + 1):
        coset = {(i << j) % n for j in range(GF_M)}
        if coset & seen:
            continue
        seen |= coset
        poly = [1]                            # prod (x - alpha^c) over the coset, coefficients in GF(2^7), low first
        for c in coset:
            root, out = exp[c], [0] * (len(poly) + 1)
            for k, p in enumerate(poly):
                out[k + 1] ^= p
                out[k] ^= _gf_mul(p, root, exp, log)
            poly = out
        assert all(p in (0, 1) for p in poly)   # a minimal polynomial is binary
        g = _clmul(g, sum(p << k for k, p in enumerate(poly)))
    return g


def _clmul(a: int, b: int) -> int:
    out = 0
    while b:
        if b & 1:
            out ^= a
        a, b = a << 1, b >> 1
    return out


def _clmod(a: int, g: int) -> int:
    d = g.bit_length()
    while a.bit_length() >= d:
        a ^= g << (a.bit_length() - d)
    return a


def secret_bytes(secret: str, length: int) -> bytes:
    k = SECRET_BYTES[length]
    data = secret.encode("utf-8")
    if len(data) > k:
        raise UserError(f"ssba_secret {secret!r} is {len(data)} bytes in UTF-8; a {length}-bit string holds at most "
                        f"{k} (BCH t = {BCH_T[length]})")
    return data + b" " * (k - len(data))


def bch_ecc(data: bytes, t: int) -> bytes:
    """Systematic parity m(x) x^deg(g) mod g(x), the first data bit the highest degree; parity bits highest degree
    first, zero bits up to whole bytes (bchlib's ECC bytes)."""
    g = bch_generator(t)
    deg = g.bit_length() - 1
    parity = _clmod(int.from_bytes(data, "big") << deg, g)
    nbytes = math.ceil(deg / 8)
    return (parity << (8 * nbytes - deg)).to_bytes(nbytes, "big")


def fingerprint(secret: str, length: int) -> torch.Tensor:
    """b* (L,) float32 of 0/1: data bits, ECC bits, zeros up to L."""
    if length not in BCH_T:
        raise UserError(f"ssba_fingerprint_length {length}: allowed 50 or 100")
    data = secret_bytes(secret, length)
    bits = "".join(f"{byte:08b}" for byte in data + bch_ecc(data, BCH_T[length]))
    bits = bits + "0" * (length - len(bits))
    return torch.tensor([int(c) for c in bits], dtype=torch.float32)


def code_bits(length: int) -> int:
    """Data plus parity bits (91 or 46): what a bounded-distance BCH decoder reads."""
    t = BCH_T[length]
    return 8 * SECRET_BYTES[length] + bch_generator(t).bit_length() - 1


def secret_recovered(pred_bits: torch.Tensor, b_star: torch.Tensor) -> torch.Tensor:
    """Per row: the code bits read back lie within Hamming distance t of b*'s, i.e. exactly when a bounded-distance
    decoder returns the secret (no miscorrection counted, spec §7 row 7)."""
    length = b_star.numel()
    n = code_bits(length)
    wrong = (pred_bits[:, :n] != b_star[:n].to(pred_bits)).sum(1)
    return wrong <= BCH_T[length]


# --- the networks (spec §5.3) --------------------------------------------------------------------------------

def padded_size(h: int) -> int:
    return 32 * math.ceil(h / 32)


def pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero padding to size x size, floor((R - H) / 2) rows on top and the rest at the bottom (columns alike)."""
    h, w = x.shape[-2:]
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top))


def crop(z: torch.Tensor, h: int) -> torch.Tensor:
    size = z.shape[-1]
    top = (size - h) // 2
    return z[..., top:top + h, top:top + h]


def _conv(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride, 1)


class StegaStampEncoder(nn.Module):
    """E(b, z): the string's 16 x 16 x C map (dense + ReLU, nearest x R/16) beside the padded image, a U-Net of
    widths w, w, 2w, 4w, 8w with 2 x 2 up-convolutions padded bottom/right (TF's 'same'), output through a sigmoid
    (the encoded image) or raw (a residual, use_residual)."""

    def __init__(self, channels, size, length, width=32, residual=False):
        super().__init__()
        if size % 32:
            raise ValueError(f"size {size}: a multiple of 32")
        c, w = channels, width
        self.channels, self.size, self.length, self.width, self.residual = c, size, length, width, residual
        self.secret_dense = nn.Linear(length, 16 * 16 * c)
        self.conv1, self.conv2, self.conv3 = _conv(2 * c, w), _conv(w, w, 2), _conv(w, 2 * w, 2)
        self.conv4, self.conv5 = _conv(2 * w, 4 * w, 2), _conv(4 * w, 8 * w, 2)
        self.up6, self.conv6 = nn.Conv2d(8 * w, 4 * w, 2), _conv(8 * w, 4 * w)
        self.up7, self.conv7 = nn.Conv2d(4 * w, 2 * w, 2), _conv(4 * w, 2 * w)
        self.up8, self.conv8 = nn.Conv2d(2 * w, w, 2), _conv(2 * w, w)
        self.up9, self.conv9 = nn.Conv2d(w, w, 2), _conv(2 * w + 2 * c, w)
        self.conv10, self.residual_conv = _conv(w, w), nn.Conv2d(w, c, 1)

    @staticmethod
    def _up(conv, x):
        return F.relu(conv(F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (0, 1, 0, 1))))

    def forward(self, b, z):
        f = F.relu(self.secret_dense(b)).view(-1, self.channels, 16, 16)
        i = torch.cat([F.interpolate(f, scale_factor=self.size // 16, mode="nearest"), z], 1)
        c1 = F.relu(self.conv1(i))
        c2 = F.relu(self.conv2(c1))
        c3 = F.relu(self.conv3(c2))
        c4 = F.relu(self.conv4(c3))
        c5 = F.relu(self.conv5(c4))
        c6 = F.relu(self.conv6(torch.cat([c4, self._up(self.up6, c5)], 1)))
        c7 = F.relu(self.conv7(torch.cat([c3, self._up(self.up7, c6)], 1)))
        c8 = F.relu(self.conv8(torch.cat([c2, self._up(self.up8, c7)], 1)))
        c9 = F.relu(self.conv9(torch.cat([c1, self._up(self.up9, c8), i], 1)))
        o = self.residual_conv(F.relu(self.conv10(c9)))   # conv10, as BackdoorBench (StegaStamp's TF reads conv9)
        return o if self.residual else torch.sigmoid(o)


class StegaStampDecoder(nn.Module):
    """D(z) -> L logits: seven 3 x 3 convolutions (R -> R/32), dense 512, dense L."""

    def __init__(self, channels, size, length, width=32):
        super().__init__()
        c, w = channels, width
        self.channels, self.size, self.length, self.width = c, size, length, width
        plan = [(c, w, 2), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 2 * w, 2), (2 * w, 4 * w, 2),
                (4 * w, 4 * w, 2)]
        self.convs = nn.Sequential(*[m for a, b, s in plan for m in (_conv(a, b, s), nn.ReLU())])
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * (size // 32) ** 2, 512), nn.ReLU(),
                                   nn.Linear(512, length))

    def forward(self, z):
        return self.dense(self.convs(z))


INITS = ("pytorch", "stegastamp")


def stegastamp_init_(encoder, decoder):
    """StegaStamp's TF initialisation (models.py): He-normal encoder, Glorot-uniform decoder (Keras' default), zero
    biases. BackdoorBench's port keeps PyTorch's defaults, whose signal shrinks layer by layer; with them a width-8
    encoder stayed at bit accuracy 0.50 for 2,000 steps (docs/experiments/generated_triggers.md)."""
    for net, init in ((encoder, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")),
                      (decoder, nn.init.xavier_uniform_)):
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                init(m.weight)
                nn.init.zeros_(m.bias)


def make_networks(channels, size, length, width, residual, seed, decoder_width=None, init="pytorch"):
    """(E, D) initialised from the resource seed's own stream, the encoder first: PyTorch's defaults (BackdoorBench)
    or StegaStamp's (init="stegastamp"). decoder_width defaults to width."""
    if init not in INITS:
        raise ValueError(f"init {init!r}: one of {INITS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "ssba_init"))
        E = StegaStampEncoder(channels, size, length, width, residual)
        D = StegaStampDecoder(channels, size, length, decoder_width or width)
        if init == "stegastamp":
            stegastamp_init_(E, D)
        return E, D


def encode(encoder, bits, x):
    """y = crop(E(b, pad(x))), or x + crop(E(b, pad(x))) for a residual encoder (not clipped: training's y)."""
    out = crop(encoder(bits, pad(x, encoder.size)), x.shape[-1])
    return x + out if encoder.residual else out


def decode(decoder, y):
    return decoder(pad(y, decoder.size))


# --- training (spec §5.5) ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSettings:
    length: int
    width: int                  # the encoder's
    decoder_width: int
    init: str                   # "pytorch" or "stegastamp" (make_networks)
    residual: bool
    epochs: int
    steps: Optional[int]        # when set, replaces epochs
    batch_size: int
    lr: float
    l2_weight: float            # W
    l2_await: int               # A
    l2_ramp: int                # Rm
    bce_weight: float           # beta
    activation_acc: float       # the batch bit accuracy (strictly above) that starts the L2 schedule


def l2_weight(s, W, A, Rm):
    """lambda = min(max(0, W (s - A) / Rm), W); s the activation counter (-1 before activation). Floats or tensors."""
    v = W * (s - A) / Rm
    return v.clamp(0, W) if isinstance(v, torch.Tensor) else min(max(0.0, v), W)


def next_counter(s: torch.Tensor, acc: torch.Tensor, threshold: float) -> torch.Tensor:
    """s -> 0 at the first batch accuracy strictly above the threshold, then +1 per step; never undone."""
    return torch.where(s < 0, torch.where(acc > threshold, 0.0, -1.0).to(s), s + 1)


@dataclass
class Trained:
    encoder: nn.Module          # on the CPU, fp32, eval mode
    decoder: nn.Module
    curve: dict                 # name -> (rows,) float64: a row every log_every steps and after the last
    steps: int
    activation_step: Optional[int]   # the step whose accuracy started the schedule (None: never)
    final_l2_weight: float
    final_bit_acc: float        # mean bit accuracy of the last logged window
    seconds: float


CURVE = ("step", "epoch", "loss", "bce_loss", "l2_loss", "l2_weight", "bit_acc", "seconds")


def train_stegastamp(x_u8: torch.Tensor, st: TrainSettings, seed: int, device, channels_last=False, log=print,
                     log_every=100) -> Trained:
    """E and D trained together on the uint8 images x_u8 (N, C, H, W) with fresh random strings: Adam on
    lambda * MSE(y, x) + beta * BCE(D(y), b), lambda ramping to W once a batch's bit accuracy exceeded the
    threshold. fp32, no autocast; the activation counter lives on the device (no host sync but every log_every
    steps). Curve rows hold the means over the steps since the previous row (lambda: at the row's step)."""
    n, c, h, _ = x_u8.shape
    E, D = make_networks(c, padded_size(h), st.length, st.width, st.residual, seed, st.decoder_width, st.init)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    E, D = E.to(device, memory_format=fmt).train(), D.to(device, memory_format=fmt).train()
    params = [*E.parameters(), *D.parameters()]
    opt = torch.optim.Adam(params, lr=st.lr, betas=(0.9, 0.999), eps=1e-8, **fused(params))
    shuffle_gen, bits_gen = generator(seed, "ssba_shuffle"), generator(seed, "ssba_bits")
    x_dev = x_u8.to(device)
    per_epoch = math.ceil(n / st.batch_size)
    total = st.steps if st.steps is not None else st.epochs * per_epoch

    def batches():
        epoch = 0
        while True:
            epoch += 1
            order = torch.randperm(n, generator=shuffle_gen)
            for i in range(0, n, st.batch_size):
                yield epoch, order[i:i + st.batch_size]

    s = torch.full((), -1.0, dtype=torch.float64, device=device)
    activation = torch.full((), -1, dtype=torch.int64, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    rows, since, t0 = [], 0, time.time()
    bar = progress(zip(range(1, total + 1), batches()), "ssba encoder", total=total)
    for k, (epoch, idx) in bar:
        x = to_unit(x_dev[to_device(idx, device)]).contiguous(memory_format=fmt)
        b = to_device(torch.randint(0, 2, (len(idx), st.length), generator=bits_gen).float(), device)
        y = encode(E, b, x)
        logits = decode(D, y)
        lam = l2_weight(s, st.l2_weight, st.l2_await, st.l2_ramp)      # from s before this step's update
        l2 = F.mse_loss(y, x)
        bce = F.binary_cross_entropy_with_logits(logits, b)
        loss = lam.float() * l2 + st.bce_weight * bce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = ((logits.detach() > 0) == (b > 0.5)).sum().double() / b.numel()
        s_new = next_counter(s, acc, st.activation_acc)
        activation = torch.where((s < 0) & (s_new >= 0), k, activation)
        s = s_new
        sums += torch.stack([loss.detach().double(), bce.detach().double(), l2.detach().double(), acc])
        since += 1
        if k % log_every == 0 or k == total:
            m = (sums / since).tolist()
            lam_now = l2_weight(s, st.l2_weight, st.l2_await, st.l2_ramp).item()
            rows.append([k, epoch, *m[:3], lam_now, m[3], round(time.time() - t0, 2)])
            sums.zero_()
            since = 0
            bar.set_postfix(acc=f"{m[3]:.3f}", l2w=f"{lam_now:.3g}")
            if k % (10 * log_every) == 0 or k == total:
                log(f"ssba encoder step {k}/{total} (epoch {epoch}): loss {m[0]:.4f}, bce {m[1]:.4f}, l2 {m[2]:.5f}, "
                    f"lambda {lam_now:.3g}, bit accuracy {m[3]:.4f}, {rows[-1][-1]:.0f} s")
    seconds = round(time.time() - t0, 2)
    curve = {name: torch.tensor([r[j] for r in rows], dtype=torch.float64) for j, name in enumerate(CURVE)}
    act = int(activation)
    cpu = lambda net: net.to("cpu", memory_format=torch.contiguous_format).eval()   # noqa: E731
    return Trained(cpu(E), cpu(D), curve, total, act if act > 0 else None,
                   l2_weight(s, st.l2_weight, st.l2_await, st.l2_ramp).item(), rows[-1][6], seconds)


# --- canonical encoding and figures (spec §5.6, §5.5 step 10) -------------------------------------------------

def quantize(y: torch.Tensor) -> torch.Tensor:
    """round_half_even(255 clip(y, 0, 1)) -> uint8."""
    return (255 * y.clamp(0, 1)).round().to(torch.uint8)


def float64_encoder(encoder, device="cpu"):
    return copy.deepcopy(encoder).to(device, torch.float64, memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def canonical_encode(encoder64, bits, x_u8, device="cpu", chunk=256) -> torch.Tensor:
    """q(y) of every image with the one string `bits`, in float64 (encoder64: float64_encoder), chunk by chunk in
    index order; residual mode clips x + r. Returns uint8 on the CPU."""
    out = torch.empty_like(x_u8, device="cpu")
    b = bits.to(device, torch.float64).view(1, -1)
    for i in range(0, len(x_u8), chunk):
        x = x_u8[i:i + chunk].to(device, torch.float64) / 255
        out[i:i + chunk] = quantize(encode(encoder64, b.expand(len(x), -1), x)).cpu()
    return out


def stealth(clean_u8, encoded_u8) -> dict:
    """PSNR (0-255, per image, then the mean), mean and max |u' - u| in grey levels."""
    d = encoded_u8.double() - clean_u8.double()
    mse = d.pow(2).flatten(1).mean(1).clamp_min(1e-10)    # an unchanged image: 148 dB, not inf
    return {"psnr_mean": (10 * torch.log10(255.0 ** 2 / mse)).mean().item(), "residual_mean": d.abs().mean().item(),
            "residual_max": d.abs().max().item()}


@torch.no_grad()
def bit_figures(decoder, encoded_u8, bits, device, batch=256) -> dict:
    """Bit accuracy of D (fp32) on uint8 images against the strings `bits` (one per image, or one for all) and the
    rate of images whose secret is recovered."""
    D = decoder.to(device).eval()
    hits, recovered, n = 0, 0, len(encoded_u8)
    for i in range(0, n, batch):
        pred = (decode(D, to_unit(encoded_u8[i:i + batch].to(device))) > 0).float()
        b = (bits[i:i + batch] if bits.dim() == 2 else bits.expand(len(pred), -1)).to(device)
        hits += int((pred == b).sum())
        if bits.dim() == 1:
            recovered += int(secret_recovered(pred, b[0]).sum())
    out = {"bit_acc": hits / (n * bits.shape[-1])}
    if bits.dim() == 1:
        out["secret_recovery"] = recovered / n
    return out


@torch.no_grad()
def evaluate_stegastamp(E, D, x_test_u8, b_eval, seed, device, batch=256, n_canonical=1000) -> dict:
    """Spec §5.5 step 10 on the test split: D on E's fp32 encodings (stored as uint8, as images are) of fresh random
    strings and of b_eval; stealth of the canonical encodings of the first n_canonical test images."""
    E = E.to(device).eval()
    gen = generator(seed, "ssba_eval_bits")
    rand = torch.randint(0, 2, (len(x_test_u8), b_eval.numel()), generator=gen).float()
    figures = {}
    for name, bits in (("random", rand), ("secret_a", b_eval)):
        enc = torch.cat([quantize(encode(E, (bits[i:i + batch] if bits.dim() == 2 else
                                             bits.expand(len(x_test_u8[i:i + batch]), -1)).to(device),
                                         to_unit(x_test_u8[i:i + batch].to(device)))).cpu()
                         for i in range(0, len(x_test_u8), batch)])
        f = bit_figures(D, enc, bits, device, batch)
        figures[f"bit_acc_test_{name}"] = f["bit_acc"]
        if "secret_recovery" in f:
            figures["secret_recovery_test_a"] = f["secret_recovery"]
    first = x_test_u8[:n_canonical]
    figures.update(stealth(first, canonical_encode(float64_encoder(E), b_eval, first)))
    E.cpu(), D.cpu()
    return figures
