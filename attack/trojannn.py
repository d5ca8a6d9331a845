"""TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang, Zhang, "Trojaning Attack on Neural Networks", NDSS 2018; spec:
docs/specs/trojannn.md), as BackdoorBench runs it: the trigger is computed from a trained clean model. The few
neurons of the selected layer's input that feed that layer most strongly (column sums of |W|) are chosen; the pixels
inside a mask (a square) are then moved by sign steps in an L-inf box around the mask image until those neurons
approach a large target value when the masked image alone is shown to the model. The optimised patch is then an
ordinary dirty-label trigger: a fresh model is trained from scratch on the poisoned training set (the paper's
retraining of the published model is not offered).

    python attack/trojannn.py --save_folder_name trojannn_demo

Two resources (utils/resources.py), found and reused when they exist: the clean model (utils/clean_model.py) and the
trigger `trojannn_trigger_<dataset>_<model>_s<seed>` (the neurons, the optimised image, its pattern P and mask K).
The record holds P and K, so the resource folders may be deleted afterwards.
"""
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from models import build_model
from utils.attack import attack_config, run_attack
from utils.clean_model import clean_model
from utils.config import Opt, in_range
from utils.data import dataset_info, load_dataset
from utils.engine.device import pick_device
from utils.engine.epoch import progress
from utils.errors import UserError, run_main
from utils.io import atomic_write_bytes
from utils.plots import _png, plt
from utils.poison import tensor_sha256
from utils.registry import register
from utils.resources import data_identity, obtain, resource_options, resource_root, resource_seed, save_tensors
from utils.seeding import set_determinism
from utils.stages import module
from utils.triggers import AdditiveTrigger, file_sha256, load_image_pattern, pattern_png_bytes, register_trigger


def target_values(v):
    """One target value for every neuron, or one per neuron: 100, '100,50', [100, 50]."""
    items = v.strip("[] ").replace(",", " ").split() if isinstance(v, str) else \
        [v] if isinstance(v, (int, float)) else v
    if isinstance(v, bool) or not items:
        raise ValueError("expected a number or a list of numbers, e.g. 100 or 100,50")
    out = [float(w) for w in items]
    return out[0] if len(out) == 1 else out


OPTIONS = [
    Opt("selected_layer_name", str, "head", "module whose input holds the neurons (BackdoorBench's `linear` = head)"),
    Opt("selected_layer_param_name", str, "head.weight", "weight whose dim 1 indexes those neurons; a neuron's "
        "score is the sum of |W| over dim 0 (and the kernel axes)"),
    Opt("num_neuron", int, 2, "neurons optimised", check=in_range(1)),
    Opt("neuron_target_values", target_values, 100.0, "target activation, one value or one per neuron"),
    Opt("mask_path", str, None, "an image file whose non-zero pixels are the trigger region (default: the square "
        "of rows and columns 145-203 of a 224x224 image, resized)"),
    Opt("mask_update_iters", int, 1000, "maximum optimisation steps", check=in_range(1)),
    Opt("mask_update_eps", float, 0.3, "L-inf bound around the mask image", check=in_range(0, lo_open=True)),
    Opt("mask_update_alpha", float, 0.1, "sign-step size", check=in_range(0, lo_open=True)),
    Opt("mask_update_tolerance", float, 1e-3, "stop when the cost falls below this", check=in_range(0)),
    Opt("trojannn_insert", str, "add", "add: u + P saturated at 255 (BackdoorBench); stamp: p u + (1 - p) P inside "
        "the mask (the authors' code)", choices=("add", "stamp")),
    Opt("trojannn_transparency", float, 0.7, "p of stamp: the image's share inside the mask",
        check=in_range(0, 1, hi_open=True)),
    *resource_options(),
]

ALIASES = {"linear": "head", "linear.weight": "head.weight", "linear.bias": "head.bias"}   # BackdoorBench's names
SQUARE = (145, 204)   # the authors' square at 224x224: rows and columns 145..203


# --- the stamp trigger ---------------------------------------------------------------------------------------------

@register_trigger
@dataclass
class MaskedBlendTrigger:
    """The authors' stamping: inside the mask K, x' = trunc(clip(p x + (1 - p) P, 0, 255)) in float64; outside, x.
    pattern and mask uint8 (C, H, W), mask in {0, 1}."""
    pattern: torch.Tensor
    mask: torch.Tensor
    transparency: float
    kind: ClassVar[str] = "masked_blend"

    def apply(self, x, idx=None, gen=None, train=True):
        if x.dtype != torch.uint8:
            raise TypeError("triggers act on uint8 images")
        p, inside = self.pattern.to(x.device, torch.float64), self.mask.to(x.device) > 0
        a = self.transparency
        out = torch.empty_like(x)
        for i in range(0, len(x), 4096):   # bounded memory: float64 copies of a chunk only
            xb = x[i:i + 4096]
            mixed = (a * xb.to(torch.float64) + (1 - a) * p).clamp_(0, 255).to(torch.uint8)
            out[i:i + 4096] = torch.where(inside, mixed, xb)
        return out

    def spec(self):
        return {"kind": self.kind, "pattern_sha256": tensor_sha256(self.pattern),
                "mask_sha256": tensor_sha256(self.mask),
                "transparency": self.transparency}

    def tensors(self):
        return {"pattern": self.pattern, "mask": self.mask}

    @classmethod
    def from_record(cls, spec, tensors):
        return cls(tensors["pattern"], tensors["mask"], float(spec["transparency"]))


def make_insert(cfg, pattern, mask):
    """§5.3: `add` is the additive trigger with P as float32 (exact on integers, saturating at 255)."""
    if cfg["trojannn_insert"] == "add":
        p = pattern.to(torch.float32)
        return AdditiveTrigger(p, p.clone())
    return MaskedBlendTrigger(pattern, mask, cfg["trojannn_transparency"])


# --- the mask ------------------------------------------------------------------------------------------------------

def square_mask(shape) -> torch.Tensor:
    """The authors' square drawn at 224x224 in grey, resized bilinearly (PIL) to the dataset size: uint8 (C, H, W)."""
    from PIL import Image
    c, h, w = shape
    a = np.zeros((224, 224), dtype=np.uint8)
    a[SQUARE[0]:SQUARE[1], SQUARE[0]:SQUARE[1]] = 255
    im = Image.fromarray(a, "L")
    if (w, h) != (224, 224):
        im = im.resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.array(im))[None].expand(c, h, w).contiguous()


def mask_image(cfg, shape):
    """(m float32 (C, H, W) in [0, 1], what the identity and the record say of its source)."""
    if cfg["mask_path"] is None:
        return square_mask(shape).float() / 255, "square"
    u = load_image_pattern(cfg["mask_path"], shape)
    if not (u > 0).any():
        raise UserError(f"mask_path {cfg['mask_path']} has no non-zero pixel at {shape[1]}x{shape[2]}: no trigger "
                        "region; give an image with a white region on black")
    return u.float() / 255, {"file": str(cfg["mask_path"]), "sha256": file_sha256(cfg["mask_path"])}


# --- neuron selection (§5.1) ---------------------------------------------------------------------------------------

def resolve_layer(model, layer_name, param_name):
    """(layer name, parameter name, the layer, its weight W), BackdoorBench's `linear` names read as `head`."""
    layer_name, param_name = ALIASES.get(layer_name, layer_name), ALIASES.get(param_name, param_name)
    layer = module(model, layer_name)
    params = dict(model.named_parameters())
    if param_name not in params:
        weights = [n for n, p in params.items() if p.dim() in (2, 4)]
        raise UserError(f"selected_layer_param_name {param_name!r}: the model has no such parameter; e.g. "
                        f"{', '.join(weights[-3:])}")
    w = params[param_name]
    if w.dim() not in (2, 4):
        raise UserError(f"selected_layer_param_name {param_name!r} has shape {tuple(w.shape)}; allowed: a linear "
                        "(out x in) or convolution (out x in x kh x kw) weight")
    return layer_name, param_name, layer, w


def neuron_scores(w: torch.Tensor) -> torch.Tensor:
    """score_j = sum over the layer's outputs (and kernel positions) of |W[o, j]|: how strongly input j feeds it."""
    if w.dim() not in (2, 4):
        raise UserError(f"neuron scores need a 2-D or 4-D weight, got shape {tuple(w.shape)}")
    a = w.detach().abs().double()
    return (a.sum(dim=(2, 3)) if a.dim() == 4 else a).sum(dim=0).float()


def select_neurons(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best, in descending score; ties to the lower index (a stable sort)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k].to(torch.int64)


# --- trigger optimisation (§5.2) -----------------------------------------------------------------------------------

@contextmanager
def layer_input(layer):
    """The input of `layer` in each forward pass while open (the hook goes with the context)."""
    seen = {}
    handle = layer.register_forward_pre_hook(lambda mod, inputs: seen.__setitem__("a", inputs[0]))
    try:
        yield seen
    finally:
        handle.remove()


def rounded(values):
    return [round(v, 4) for v in values]


def quantise(x: torch.Tensor) -> torch.Tensor:
    """P = trunc(fl32(255 x)): ToPILImage's float -> byte conversion truncates."""
    return (x.to(torch.float32) * 255).to(torch.uint8)


def optimise_trigger(model, layer, n_inputs, neurons, targets, m, eps, alpha, iters, tolerance, log=print):
    """Sign descent on cost = sum_i sum (a(x K)[:, n_i] - tau_i)^2, x kept in [x0 - eps, x0 + eps] and [0, 1],
    x0 = m, K = [m > 0]; stops after the step whose cost (computed before it) is below tolerance. fp32, no autocast,
    model in eval mode, batch of one. Returns x*, the cost per step, the mean neuron values before and after."""
    device = next(model.parameters()).device
    x0 = m[None].to(device, torch.float32)
    keep = (x0 > 0).to(torch.float32)
    tau = torch.as_tensor(targets, dtype=torch.float32, device=device)
    x, costs = x0.clone(), []

    def values(a):   # mean over the batch and the positions of each chosen neuron
        sel = a[:, neurons]
        return sel.transpose(0, 1).reshape(len(neurons), -1).mean(1)

    with layer_input(layer) as seen, torch.enable_grad():
        for i in progress(range(iters), "trojannn trigger"):
            x.requires_grad_(True)
            model(x * keep)
            a = seen["a"]
            if i == 0:
                if a.shape[1] != n_inputs:
                    raise UserError(f"the selected weight's dim 1 has {n_inputs} entries but the input of the "
                                    f"selected layer has {a.shape[1]} channels or features; pick that layer's weight")
                before = values(a.detach())
            sel = a[:, neurons]
            cost = ((sel - tau.view(1, -1, *[1] * (sel.dim() - 2))) ** 2).sum()
            g, = torch.autograd.grad(cost, x)
            with torch.no_grad():
                x = (x0 + (x - alpha * g.sign() - x0).clamp(-eps, eps)).clamp(0, 1)
            costs.append(cost.item())
            if (i + 1) % 100 == 0:
                log(f"trojannn trigger: step {i + 1}: cost {costs[-1]:.4f}")
            if costs[-1] < tolerance:   # BackdoorBench checks after its update: the step is kept
                break
        with torch.no_grad():
            model(x * keep)
            after = values(seen["a"])
    return {"x_star": x.detach().cpu(), "cost": torch.tensor(costs, dtype=torch.float32),
            "before": before.cpu(), "after": after.cpu()}


# --- the trigger resource ------------------------------------------------------------------------------------------

def trigger_params(cfg, shape):
    """(every parameter of the trigger resource, the mask image m, what the record says of its source)."""
    m, source = mask_image(cfg, shape)
    k = cfg["num_neuron"]
    tau = cfg["neuron_target_values"]
    taus = [float(tau)] * k if isinstance(tau, float) else list(tau)
    params = {"selected_layer_name": ALIASES.get(cfg["selected_layer_name"], cfg["selected_layer_name"]),
              "selected_layer_param_name": ALIASES.get(cfg["selected_layer_param_name"],
                                                       cfg["selected_layer_param_name"]),
              "neuron_rule": "outgoing", "num_neuron": k, "neuron_target_values": taus,
              "mask": source if source == "square" else {"sha256": source["sha256"]},
              **{key: cfg[key] for key in ("mask_update_eps", "mask_update_alpha", "mask_update_iters",
                                           "mask_update_tolerance")}}
    return params, m, source


def build_trigger(folder, model, params, m, source, device) -> dict:
    """§5.1-5.2 on the clean model into `folder`: tensors.safetensors, trigger.png, cost.png, log.txt."""
    with open(folder / "log.txt", "w") as logfile:
        def log(line):
            print(line)
            logfile.write(line + "\n")
        t0 = time.time()
        model = model.to(device).eval().requires_grad_(False)
        _, _, layer, w = resolve_layer(model, params["selected_layer_name"], params["selected_layer_param_name"])
        scores = neuron_scores(w)
        idx = select_neurons(scores, params["num_neuron"])
        log(f"trojannn trigger: neurons {idx.tolist()} of {params['selected_layer_name']}'s {len(scores)} inputs, "
            f"scores {rounded(scores[idx].tolist())}; mask {source if source == 'square' else source['file']}")
        out = optimise_trigger(model, layer, w.shape[1], idx.to(device), params["neuron_target_values"], m,
                               params["mask_update_eps"], params["mask_update_alpha"], params["mask_update_iters"],
                               params["mask_update_tolerance"], log)
        x_star = out["x_star"]
        pattern, mask = quantise(x_star[0]), (m > 0).to(torch.uint8)
        log(f"trojannn trigger: {len(out['cost'])} steps, cost {out['cost'][0]:.4f} -> {out['cost'][-1]:.4f}; neuron "
            f"values {rounded(out['before'].tolist())} -> {rounded(out['after'].tolist())}; "
            f"P: {int((pattern > 0).sum())} values > 0, mean {pattern[pattern > 0].float().mean():.1f}")
        save_tensors(folder, {"x_star": x_star, "pattern": pattern, "mask": mask, "neuron_idx": idx,
                              "neuron_score": scores[idx], "cost": out["cost"], "neuron_value_before": out["before"],
                              "neuron_value_after": out["after"]})
        atomic_write_bytes(folder / "trigger.png", trigger_picture(m, x_star[0], pattern))
        atomic_write_bytes(folder / "cost.png", cost_picture(out["cost"]))
    return {"device": str(device), "precision": "fp32", "mask_source": source, "neuron_idx": idx.tolist(),
            "neuron_score": scores[idx].tolist(), "neuron_value_before": out["before"].tolist(),
            "neuron_value_after": out["after"].tolist(), "iterations": len(out["cost"]),
            "final_cost": out["cost"][-1].item(), "trigger_pixels": int((pattern > 0).sum()),
            "pattern_sha256": tensor_sha256(pattern), "optimise_seconds": round(time.time() - t0, 2)}


def trigger_resource(cfg, dataset, model, clean_res, resume=False):
    """The trigger resource of this clean model: found, or built (an iteration bar)."""
    params, m, source = trigger_params(cfg, dataset.info.shape)
    seed = resource_seed(cfg)
    identity = {"kind": "trojannn_trigger", **data_identity(dataset), "model": cfg["model"],
                "model_width": cfg["model_width"], "params": {"clean_model": clean_res.name, **params},
                "upstream_clean_model": clean_res.digest(), "seed": seed}
    device = pick_device(cfg["device"])

    def build(folder, resumed):
        set_determinism(cfg["deterministic"], device)   # as the clean model's training: reproducible kernels
        return build_trigger(folder, model, params, m, source, device)
    return obtain(resource_root(cfg), f"trojannn_trigger_{cfg['dataset']}_{cfg['model']}_s{seed}", identity, build,
                  rebuild=cfg["resource_rebuild"], resume=resume)


def trigger_picture(m, x_star, pattern) -> bytes:
    """m, x* and P side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(6, 2.3))
    for ax, img, title in zip(axes, (m, x_star, pattern.float() / 255), ("mask m", "optimised x*", "pattern P")):
        a = img.clamp(0, 1).numpy()
        ax.imshow(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


def cost_picture(cost) -> bytes:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(cost) + 1), cost.numpy())
    ax.set_xlabel("step")
    ax.set_ylabel("cost")
    ax.grid(alpha=0.3)
    ax.set_title("trojannn trigger: neuron cost", fontsize=10)
    return _png(fig)


# --- configure and main --------------------------------------------------------------------------------------------

def deviations(cfg) -> list:
    out = ["the trigger is optimised in pixel space with the normalisation inside the model (BackdoorBench feeds "
           "un-normalised [0, 1] inputs to a model trained on normalised ones)",
           "neuron scores from the trained clean model's head (BackdoorBench: a randomly initialised 1000-output head)"]
    if cfg["mask_path"] is None:
        out.append("mask: the toolkit's square (BackdoorBench: apple4.png, which cannot ship with the toolkit)")
    if cfg["trojannn_insert"] == "add":
        out.append("saturating insertion min(u + P, 255) (BackdoorBench casts to uint8 before clipping: sums wrap)")
    if cfg["reserve_ratio"] > 0:
        out.append("the clean model was trained on the whole training split, the clean reserve included (the "
                   "attacked model never sees the reserve)")
    return out


@register("trojannn", "attack", paper="Liu et al., NDSS 2018", needs=("dataset",), options=OPTIONS,
          summary="TrojanNN: a patch optimised on a clean model to excite its most connected neurons")
def configure(argv=None):
    """Every setting resolved and checked; nothing written, no resource built (the sweep checks its jobs with this)."""
    cfg, args = attack_config("trojannn", OPTIONS, argv, __doc__)
    info = dataset_info(cfg["dataset"])
    with torch.random.fork_rng(devices=[]):   # an untrained model of the same shape, to check the layer's names
        probe = build_model(cfg["model"], info.num_classes, info.shape[0], info.mean, info.std, cfg["model_width"])
    _, _, _, w = resolve_layer(probe, cfg["selected_layer_name"], cfg["selected_layer_param_name"])
    k, tau = cfg["num_neuron"], cfg["neuron_target_values"]
    if k > w.shape[1]:
        raise UserError(f"num_neuron = {k} but {cfg['selected_layer_param_name']} has {w.shape[1]} inputs; "
                        f"allowed: 1..{w.shape[1]}")
    if isinstance(tau, list) and len(tau) != k:
        raise UserError(f"neuron_target_values has {len(tau)} values for num_neuron = {k}; give one value or {k}")
    mask_image(cfg, info.shape)   # a mask file that cannot be read is refused now
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    dataset = load_dataset(cfg["dataset"], cfg["dataset_path"])
    model, clean_res = clean_model(cfg, dataset, resume=args.resume)
    trig_res = trigger_resource(cfg, dataset, model, clean_res, resume=args.resume)
    t, meta = trig_res.tensors(), trig_res.meta
    trigger = make_insert(cfg, t["pattern"], t["mask"])
    facts = {k: meta[k] for k in ("neuron_idx", "neuron_score", "neuron_value_before", "neuron_value_after",
                                  "trigger_pixels")}
    params = meta["identity"]["params"]
    trigger_meta = {"source": "trojannn", "insert": cfg["trojannn_insert"],
                    "transparency": cfg["trojannn_transparency"] if cfg["trojannn_insert"] == "stamp" else None,
                    "resources": {r.meta["kind"]: {"name": r.name, "resource_sha256": r.digest()}
                                  for r in (clean_res, trig_res)},
                    **{k: params[k] for k in ("selected_layer_name", "selected_layer_param_name", "neuron_rule",
                                              "neuron_target_values", "mask_update_eps", "mask_update_alpha",
                                              "mask_update_iters")},
                    **facts, "mask": meta["mask_source"], "iterations_run": meta["iterations"],
                    "pattern_sha256": meta["pattern_sha256"]}
    used = [clean_res, trig_res]
    summary = {**{k: facts[k] for k in ("neuron_idx", "neuron_value_before", "neuron_value_after", "trigger_pixels")},
               "resources": [{"name": r.name, "built": r.built, "build_seconds": r.meta.get("build_seconds")}
                             for r in used]}

    note = (f"trojannn: clean model {clean_res.name} (test accuracy {clean_res.meta['test_acc']:.4f}), trigger "
            f"{trig_res.name} ({'built' if trig_res.built else 'reused'}): neurons {facts['neuron_idx']}, values "
            f"{rounded(facts['neuron_value_before'])} -> {rounded(facts['neuron_value_after'])} in "
            f"{meta['iterations']} steps; {facts['trigger_pixels']} trigger pixels, {cfg['trojannn_insert']} insertion")
    return run_attack("trojannn", cfg, args, trigger, trigger_meta, extra_config={
        "resources": [r.describe() for r in used], "deviations": deviations(cfg)},
        files={"trojannn_trigger.png": pattern_png_bytes(t["pattern"]),
               "trojannn_mask.png": pattern_png_bytes(t["mask"] * 255)}, notes=[note], summary=summary)

if __name__ == "__main__":
    run_main(main)
