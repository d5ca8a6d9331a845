"""NPD, the Neural Polarizer (Zhu, Wei, Zha, Wu, "Neural Polarizer: A Lightweight and Effective Backdoor Defense via
Purifying Poisoned Features", NeurIPS 2023, arXiv 2306.16697; spec: docs/specs/npd.md).

One learnable layer, a 1x1 convolution initialised to the identity followed by a batch norm, is inserted in front of
one convolution of the frozen backdoored model, and only that layer is trained on a small clean set: first a short
warm-up on the clean loss, then, per batch, a targeted PGD attack towards the class the polarized model finds most
likely after the true one (a stand-in for the unknown trigger's target) and an update that keeps the clean prediction
on those adversarial images while lowering the confidence of that class and of the strongest wrong class.

    python defense/npd.py --result_file badnet_demo

Project decisions (spec §7): any model (per-model default target layer, else --target_layer_name), the deployed
model is a PolarizedModel saved with its polarizer (model.pt without a plain state_dict; load_defense_model and
analysis/retune.py rebuild it), per-norm PGD defaults with explicit values honoured, the original's hard-coded
constants and tiny's special cases as keys, a class-balanced subset that honours --index, stable top-2 ties.
"""
import contextlib
import copy
import json

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.engine.augment import to_unit
from utils.engine.epoch import batch_indices, progress, weighted_sum
from utils.engine.evaluate import predict
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import fused
from utils.errors import UserError, run_main
from utils.model_file import build_from_file, register_wrapper
from utils.options import clean_subset_options
from utils.registry import register
from utils.seeding import generator

NORM_DEFAULTS = {   # trigger_norm, adv_lr, inner_steps, pgd_init: the original's L2 values and its L_inf branch
    "L2": (3.0, 0.1, 2, "zero"), "L1": (3.0, 0.1, 2, "zero"), "L_inf": (0.2, 0.44, 10, "max")}
PGD_KEYS = ("trigger_norm", "adv_lr", "inner_steps", "pgd_init")
TARGETS = {"preactresnet18": "layer4.1.conv1", "cnn": "layers.5.0"}   # per-model default of target_layer_name
REFUSED = {
    "lr_scheduler": "the original builds a scheduler for the frozen model and never uses it; the lr is constant",
    "client_optimizer": "the polarizer is trained with SGD (warm_lr; then lr, sgd_momentum, wd)",
    "target_lab": "NPD estimates the target per sample; the attack's target is never used",
    "target_class": "it only fed a logged target-class accuracy; ACC / ASR / RA are reported",
    "max_init": "use pgd_init: max", "frequency_save": "a checkpoint is written every checkpoint_every epochs",
    "print_freq": "one line per epoch is logged", "checkpoint_path": "use --resume",
}

OPTIONS = [
    *clean_subset_options(ratio=0.05, balanced=True),
    Opt("batch_size", int, 128, "batch size over the clean subset (shuffled, last batch kept)", check=in_range(1)),
    Opt("warm_epochs", int, 5, "warm-up epochs: clean loss only, polarizer in train mode", check=in_range(0)),
    Opt("warm_lr", float, 1e-4, "warm-up SGD learning rate (no momentum, no decay)", check=in_range(0, lo_open=True)),
    Opt("epochs", int, 50, "main-phase epochs", check=in_range(1)),
    Opt("lr", float, 0.01, "main-phase SGD learning rate, constant", check=in_range(0, lo_open=True)),
    Opt("sgd_momentum", float, 0.9, "main-phase SGD momentum", check=in_range(0, 1)),
    Opt("wd", float, 5e-4, "main-phase SGD weight decay", check=in_range(0)),
    Opt("target_layer_name", str, None, "the convolution whose input the polarizer transforms (unset: "
        "layer4.1.conv1 on preactresnet18, layers.5.0 on cnn; required for other models)"),
    Opt("model_name", str, "convbn", "polarizer structure: a 1x1 convolution (identity at start) and a batch norm",
        check=lambda v: None if v == "convbn" else "only convbn is implemented (the original's ablation "
        "structures linear, linear_light, mlp, onlyconv, twoconv are not)"),
    Opt("use_residual", bool, False, "add the input back: P(a) + a"),
    Opt("norm_type", str, "L2", "norm of the PGD ball", choices=tuple(NORM_DEFAULTS)),
    Opt("trigger_norm", float, None, "PGD ball radius epsilon, pixel units (unset: 3.0; L_inf 0.2)",
        check=in_range(0, lo_open=True)),
    Opt("adv_lr", float, None, "PGD step alpha (unset: 0.1; L_inf 0.44)", check=in_range(0, lo_open=True)),
    Opt("inner_steps", int, None, "PGD steps at most (unset: 2; L_inf 10)", check=in_range(1)),
    Opt("pgd_init", str, None, "PGD start: zero, or max (+epsilon everywhere) (unset: zero; L_inf max)",
        choices=("zero", "max")),
    Opt("pgd_step", str, "sign", "PGD step: the gradient's sign, or the plain gradient (the original on tiny)",
        choices=("sign", "gradient")),
    Opt("early_stop_acc", float, 0.6, "stop PGD once more than this fraction of the batch hits its target",
        check=in_range(0, 1)),
    Opt("lmd1", float, 1.0, "weight of the clean cross-entropy", check=in_range(0)),
    Opt("lmd2", float, 0.4, "weight of the cross-entropy of the adversarial images to the clean prediction",
        check=in_range(0)),
    Opt("lmd3", float, 0.4, "weight of -log(1 - p) of the strongest wrong class on the adversarial images",
        check=in_range(0)),
    Opt("lmd4", float, 0.4, "weight of -log(1 - p) of the estimated target on the adversarial images",
        check=in_range(0)),
    Opt("polarizer_train_mode", bool, False, "polarizer in train mode in the update (the original on tiny)"),
    Opt("mask_logit", float, -10.0, "value written over the true class's logit to find the estimated target"),
    Opt("loss_bound", float, 80.0, "clamp of the per-sample PGD loss", check=in_range(0, lo_open=True)),
    *(Opt(k, lambda v: v, None, "", cli=False) for k in REFUSED),   # the original's keys, refused with a reason
]
SPEC = {"cifar100": {"batch_size": 256, "epochs": 100},
        "gtsrb": {"trigger_norm": 5.0, "lmd2": 0.5, "lmd3": 0.5, "lmd4": 0.5},
        "tiny": {"warm_epochs": 0, "trigger_norm": 6.0, "pgd_step": "gradient", "lmd2": 1.0, "lmd3": 0.1,
                 "lmd4": 0.1, "polarizer_train_mode": True}}


# --- 1. the polarizer and the polarized model (spec §4, §5.1, §5.5) -------------------------------------------

def make_polarizer(channels: int) -> nn.Sequential:
    """convbn: a C -> C 1x1 convolution without bias set to the identity, then BatchNorm2d(C) as PyTorch starts it."""
    p = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
    with torch.no_grad():
        p[0].weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return p


def target_module(model: nn.Module, name: str) -> nn.Conv2d:
    found = dict(model.named_modules()).get(name)
    if not isinstance(found, nn.Conv2d):
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        what = "no module" if found is None else f"a {type(found).__name__}, not a Conv2d,"
        raise UserError(f"target_layer_name {name!r}: the model has {what} of that name; give one of its convolutions, "
                        f"e.g. {', '.join(convs[-3:])}")
    return found


class PolarizedModel(nn.Module):
    """The frozen model `inner` with P(a) (+ a with use_residual) in place of the input a of its module
    `target_layer_name`, through a forward pre-hook installed here. The model interface (conventions §2) is
    inner's, the polarizer sitting inside `features`."""

    def __init__(self, inner, polarizer, target_layer_name, input_shape, use_residual=False):
        super().__init__()
        self.inner, self.polarizer = inner, polarizer
        self.target_layer_name, self.use_residual = target_layer_name, bool(use_residual)
        self.input_shape = tuple(int(s) for s in input_shape)
        target = target_module(inner, target_layer_name)
        if target.in_channels != polarizer[0].in_channels:
            raise UserError(f"{target_layer_name} takes {target.in_channels} channels, the polarizer "
                            f"{polarizer[0].in_channels}; the model file is damaged: run the defense again")
        target.register_forward_pre_hook(self._polarize)   # a bound method: a deep copy hooks the copy's polarizer

    def _polarize(self, module, args):
        a = args[0]
        return (self.polarizer(a) + a if self.use_residual else self.polarizer(a),)

    def forward(self, x):
        return self.inner(x)

    def __getattr__(self, name):
        # the rest of the interface (features, head, normalize, stages, ...) is inner's: its modules carry the hook
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def backbone_parameters(self):
        return self.inner.backbone_parameters() + list(self.polarizer.parameters())

    def payload(self, model_name, width, dataset) -> dict:
        """model.pt (spec §5.5): raw weights under inner_state_dict (no state_dict key), the polarizer, its place."""
        n = self.inner.normalize
        return {"defense": "npd", "model_name": model_name, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "width": width, "dataset": dataset,
                "mean": n.mean.flatten().tolist(), "std": n.std.flatten().tolist(),
                "inner_state_dict": self.inner.state_dict(), "polarizer": "convbn",
                "polarizer_state_dict": self.polarizer.state_dict(), "target_layer_name": self.target_layer_name,
                "use_residual": self.use_residual, "channels": self.polarizer[0].in_channels}


@register_wrapper("npd")
def rebuild(d: dict, path, device="cpu") -> PolarizedModel:
    """An NPD model.pt (weights-only dict) -> its PolarizedModel."""
    missing = [k for k in ("polarizer", "polarizer_state_dict", "target_layer_name", "use_residual", "channels")
               if k not in d]
    if missing or d["polarizer"] != "convbn":
        raise UserError(f"{path} is an NPD model file without {', '.join(missing) or 'a convbn polarizer'}; it is "
                        "damaged: run the defense again")
    inner = build_from_file(d, path, "inner_state_dict", device)
    polarizer = make_polarizer(int(d["channels"]))
    try:
        polarizer.load_state_dict(d["polarizer_state_dict"])
    except RuntimeError:
        raise UserError(f"the polarizer in {path} does not fit {d['channels']} channels; run the defense "
                        "again") from None
    return PolarizedModel(inner, polarizer, d["target_layer_name"], d["input_shape"], d["use_residual"]).to(device)


def check_called_once(inner, name, input_shape):
    """T must see one input per forward pass: the polarizer replaces exactly that one."""
    calls = []
    h = target_module(inner, name).register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with torch.no_grad():
            inner.eval()(torch.zeros(1, *input_shape, device=inner.normalize.mean.device))
    finally:
        h.remove()
    if len(calls) != 1:
        raise UserError(f"{name} is called {len(calls)} times in one forward pass; choose a convolution called once")


# --- 2. the estimated target and the losses (spec §5.3) ---------------------------------------------------------

def estimated_target(logits, y, mask_logit=-10.0):
    """t_i = argmax of the clean logits with the true class's logit replaced by mask_logit (finite, as the original:
    when every other logit is below it, t_i = y_i)."""
    z = logits.detach().float().clone()
    z[torch.arange(len(y), device=z.device), y] = mask_logit
    return z.argmax(1)


def strongest_wrong(p, y):
    """The class of largest probability if it is not y, else the second; ties: lower index first."""
    top = torch.sort(p, dim=1, descending=True, stable=True).indices
    return torch.where(top[:, 0] == y, top[:, 1], top[:, 0])


def one_minus_loss(p, cls):
    """mean_i -log(1.0001 - p_i[cls_i] + 1e-12): pushes p_i[cls_i] down."""
    return -torch.log(1.0001 - p.gather(1, cls[:, None]).squeeze(1) + 1e-12).mean()


def update_losses(z_clean, z_adv, y, y_hat, t, cfg) -> dict:
    """L = lmd1 L1 + lmd2 L2 + lmd3 L3 + lmd4 L4, in fp32; L3 / L4 computed only when their weight is not 0."""
    z_clean, z_adv = z_clean.float(), z_adv.float()
    p = z_adv.softmax(1)
    out = {"loss_clean": F.cross_entropy(z_clean, y), "loss_adv": F.cross_entropy(z_adv, y_hat)}
    out["loss_wrong"] = one_minus_loss(p, strongest_wrong(p, y)) if cfg["lmd3"] != 0 else z_adv.new_zeros(())
    out["loss_target"] = one_minus_loss(p, t) if cfg["lmd4"] != 0 else z_adv.new_zeros(())
    out["train_loss"] = (cfg["lmd1"] * out["loss_clean"] + cfg["lmd2"] * out["loss_adv"]
                         + cfg["lmd3"] * out["loss_wrong"] + cfg["lmd4"] * out["loss_target"])
    return out


# --- 3. targeted PGD in pixel space (spec §5.3 step 2) ----------------------------------------------------------

def project(delta, norm_type, eps):
    """Per sample into the ball: L_inf clamps, L2 / L1 scale by eps / ||delta_i|| where the norm exceeds eps."""
    if norm_type == "L_inf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1)
    norm = flat.norm(dim=1) if norm_type == "L2" else flat.abs().sum(1)
    scale = torch.where(norm > eps, eps / norm.clamp(min=1e-30), torch.ones_like(norm))
    return delta * scale.view(-1, *[1] * (delta.dim() - 1))


def targeted_pgd(model, x, t, cfg, precision):
    """delta moving clip(x + delta) towards t by descent on the clamped CE; stops once the hit rate exceeds
    early_stop_acc. Returns (delta, steps made). The model sees only clip(x + delta), the algorithm's own clip."""
    eps, alpha = cfg["trigger_norm"], cfg["adv_lr"]
    delta = torch.full_like(x, eps) if cfg["pgd_init"] == "max" else torch.zeros_like(x)
    steps = 0
    for _ in range(cfg["inner_steps"]):
        delta.requires_grad_(True)
        with precision.autocast():
            z = model(precision.prepare_input((x + delta).clamp(0, 1))).float()
        loss = F.cross_entropy(z, t, reduction="none").clamp(-cfg["loss_bound"], cfg["loss_bound"]).mean()
        g, = torch.autograd.grad(loss, delta)   # delta only: the polarizer's gradient is not needed here
        step = g.sign() if cfg["pgd_step"] == "sign" else g
        delta = project(delta.detach() - alpha * step, cfg["norm_type"], eps)
        steps += 1
        with torch.no_grad(), precision.autocast():
            hit = (model(precision.prepare_input((x + delta).clamp(0, 1))).argmax(1) == t).float().mean()
        if hit.item() > cfg["early_stop_acc"]:
            break
    return delta.detach(), steps


# --- 4. the phases: warm-up, then PGD + update per batch (spec §5.2, §5.3) -------------------------------------

@contextlib.contextmanager
def frozen_statistics(polarizer):
    """Train-mode BN with momentum 0: batch statistics used, running statistics kept (the original's tiny update)."""
    bn = polarizer[1]
    saved, bn.momentum = bn.momentum, 0.0
    try:
        yield
    finally:
        bn.momentum = saved


def warm_epoch(model, x_clean, y_clean, opt, cfg, precision, gen):
    """Clean CE, polarizer in train mode (batch statistics, running statistics updated), f in eval mode."""
    dev, total, correct = x_clean.device, 0.0, 0.0
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    for idx in progress(batch_indices(len(y_clean), cfg["batch_size"], gen, device=dev), "npd warm-up"):
        x, y = precision.prepare_input(to_unit(x_clean[idx])), y_clean[idx]
        model.eval()
        model.polarizer.train()
        with precision.autocast():
            z = model(x).float()
        loss = F.cross_entropy(z, y)
        opt.zero_grad(set_to_none=True)
        precision.step(loss, opt)
        loss_sum = weighted_sum(loss_sum, loss, len(y))
        correct = correct + (z.argmax(1) == y).sum()
        total += len(y)
    model.eval()
    loss = loss_sum.item() / total
    return {"lr": opt.param_groups[0]["lr"], "train_loss": loss, "loss_clean": loss, 
            "train_acc": float(correct) / total}


def npd_batch(model, x, y, opt, cfg, precision):
    """One batch of the main phase: prediction and target estimate, targeted PGD, one update of the polarizer."""
    pol = model.polarizer
    model.eval()
    with torch.no_grad(), precision.autocast():
        z0 = model(x).float()
    y_hat, t = z0.argmax(1), estimated_target(z0, y, cfg["mask_logit"])
    delta, steps = targeted_pgd(model, x, t, cfg, precision)
    x_adv = precision.prepare_input((x + delta).clamp(0, 1))
    pol.train(cfg["polarizer_train_mode"])
    with precision.autocast():
        z_clean = model(x)
    with frozen_statistics(pol) if cfg["polarizer_train_mode"] else contextlib.nullcontext(), precision.autocast():
        z_adv = model(x_adv)
    out = update_losses(z_clean, z_adv, y, y_hat, t, cfg)
    opt.zero_grad(set_to_none=True)
    precision.step(out["train_loss"], opt)
    pol.eval()
    pred_adv = z_adv.detach().argmax(1)
    return {**out, "train_acc": (z_clean.detach().argmax(1) == y).float().mean(),
            "adv_hit_rate": (pred_adv == t).float().mean(), "adv_true_acc": (pred_adv == y).float().mean(),
            "pert_norm_mean": delta.flatten(1).norm(dim=1).mean()}, steps


def npd_epoch(model, x_clean, y_clean, opt, cfg, precision, gen):
    dev, totals, n, steps, batches = x_clean.device, {}, 0, 0, 0
    for idx in progress(batch_indices(len(y_clean), cfg["batch_size"], gen, device=dev), "npd"):
        stats, s = npd_batch(model, precision.prepare_input(to_unit(x_clean[idx])), y_clean[idx], opt, cfg, precision)
        for k, v in stats.items():
            totals[k] = weighted_sum(totals.get(k, torch.zeros((), dtype=torch.float64, device=dev)), v, len(idx))
        n, steps, batches = n + len(idx), steps + s, batches + 1
    out = {k: v / n for k, v in zip(totals, torch.stack(list(totals.values())).tolist())}
    return {"lr": opt.param_groups[0]["lr"], **out, "pgd_steps_mean": steps / batches}


def polarizer_report(model, params) -> dict:
    w, bn = model.polarizer[0].weight.detach().flatten(1).float().cpu(), model.polarizer[1]
    g, b = bn.weight.detach().float().cpu(), bn.bias.detach().float().cpu()
    return {"target_layer": model.target_layer_name, "channels": w.shape[0], "structure": "convbn",
            "use_residual": model.use_residual, "trainable_params": params,
            "w_minus_identity": torch.linalg.norm(w - torch.eye(w.shape[0])).item(),
            "gamma": {"mean": g.mean().item(), "min": g.min().item(), "max": g.max().item()},
            "beta": {"mean": b.mean().item(), "min": b.min().item(), "max": b.max().item()}}


# --- 5. configuration and main ----------------------------------------------------------------------------------

def resolve_settings(cfg):
    """Refused keys; PGD defaults by norm (explicit values honoured)."""
    for key, why in REFUSED.items():
        if cfg.pop(key) is not None:
            raise UserError(f"key '{key}' is not accepted by NPD: {why}")
    for key, value in zip(PGD_KEYS, NORM_DEFAULTS[cfg["norm_type"]]):
        cfg[key] = value if cfg[key] is None else cfg[key]
    if cfg["norm_type"] == "L_inf" and cfg["trigger_norm"] >= 1:
        raise UserError(f"trigger_norm {cfg['trigger_norm']} under norm_type L_inf covers the whole pixel range (the "
                        "dataset's file sets an L2 radius); give --trigger_norm, e.g. 0.2 (the original's L_inf value)")


@register("npd", "defense", paper="Zhu et al., NeurIPS 2023", needs=("trained_model", "clean_subset"), options=OPTIONS,
          summary="Neural Polarizer: one learnable layer inserted into the frozen model, trained to filter trigger "
                  "features")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("npd", OPTIONS, argv, __doc__, dataset=dataset,
                               spec_for=lambda cfg, dataset: SPEC.get(dataset, {}))
    resolve_settings(cfg)
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("npd", cfg, args)
    try:
        info, precision = ctx.record.model_info, ctx.precision
        name = cfg["target_layer_name"] or TARGETS.get(info["model_name"])
        if name is None:
            raise UserError(f"NPD has no default place in a {info['model_name']}: give --target_layer_name, the "
                            "convolution whose input the polarizer transforms")
        x_clean, y_clean, _ = ctx.clean_subset(cfg["ratio"], cfg["balanced"], cfg["index"])
        inner = copy.deepcopy(ctx.record.model).to(ctx.device).requires_grad_(False)
        check_called_once(inner, name, info["input_shape"])
        polarizer = make_polarizer(target_module(inner, name).in_channels)
        model = precision.prepare_model(PolarizedModel(inner, polarizer, name, info["input_shape"],
                                                       cfg["use_residual"])).eval()
        params = list(model.polarizer.parameters())
        n_params = sum(p.numel() for p in params)
        ctx.run.update_meta(polarizer={"target_layer": name, "channels": polarizer[0].in_channels, "params": n_params})
        print(f"polarizer (convbn, {n_params} parameters) on the input of {name}; {len(y_clean)} clean samples")
        warm_opt = torch.optim.SGD(params, lr=cfg["warm_lr"], **fused(params))
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"],
                              **fused(params))
        gen = generator(cfg["random_seed"], "shuffle")
        sets = ctx.eval_sets

        def evaluate():
            m = ctx.evaluate(model)
            _, m["ra_test_loss"] = predict(model, sets.x_bd, precision, cfg["eval_batch_size"], sets.y_bd_true)
            return m

        w = cfg["warm_epochs"]
        phases = [Phase("insert", 1, lambda e: {"lr": None}, evaluate, label="after insertion, epoch", start=0),
                  Phase("warm-up", w, lambda e: warm_epoch(model, x_clean, y_clean, warm_opt, cfg, precision, gen),
                        evaluate, label="warm-up epoch"),
                  Phase("train", cfg["epochs"], lambda e: npd_epoch(model, x_clean, y_clean, opt, cfg, precision, gen),
                        evaluate, start=w + 1, show=("adv_hit_rate",))]
        rows = fit(ctx.run, phases, {"polarizer": model.polarizer, "warm_optimizer": warm_opt, "optimizer": opt,
                                     "shuffle_gen": GeneratorState(gen), "precision": precision})
        model.eval()
        report = polarizer_report(model, n_params)
        ctx.run.write_file("polarizer.json", json.dumps(report, indent=1) + "\n")
        warm = next((r for r in rows if r.get("phase") == "warm-up" and r["epoch"] == w), None)
        return finish_defense(ctx, rows, model.payload(info["model_name"], info["width"], info["dataset"]), {
            "target_layer": name, "polarizer_params": n_params, "w_minus_identity": report["w_minus_identity"],
            **{f"warmup_{k}": warm[k] if warm else None for k in ("test_acc", "test_asr", "test_ra")},
            "epochs": cfg["epochs"], "warm_epochs": w, "clean_subset_size": len(y_clean),
            "train_seconds": round(sum(r["seconds"] for r in rows), 2)})
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
