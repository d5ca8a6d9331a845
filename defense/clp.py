"""CLP, Channel Lipschitzness-based Pruning (Zheng, Tang, Li, Liu, "Data-free Backdoor Removal based on Channel
Lipschitzness", ECCV 2022, arXiv 2208.03111; spec: docs/specs/clp.md).

A data-free purification. Trigger-sensitive channels have a large Lipschitz constant; for a convolution followed by
BatchNorm an upper bound per output channel k (UCLC) is the spectral norm of that channel's kernel times the BN
factor |gamma_k| / sigma_k. Within each BN layer, channels whose UCLC exceeds mean + u * std of the layer are
switched off by zeroing their gamma and beta. No data, no training: the pruned model is the result.

    python defense/clp.py --result_file badnet_demo

Project decisions (spec §7): a BN is scored with the convolution whose output it reads, found by tracing one
forward pass of an all-zero batch (`pairing: registration` reproduces the originals' "last Conv2d registered");
sigma_k includes the BN's eps; scores in float64 on the CPU, non-finite scores are an error; a one-channel layer is
skipped; the u sweep over the test sets is logged only (u_sweep.csv), never used to choose u.
"""
import copy
import json
import time

import torch
from torch import nn

from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.engine.evaluate import eval_mode
from utils.engine.loop import Phase, fit
from utils.errors import UserError, run_main
from utils.registry import register

OPTIONS = [
    Opt("u", float, 3.0, "threshold: prune channels whose UCLC > mean + u * std of their layer", check=in_range(0)),
    Opt("pairing", str, "direct", "which convolution scores a BN: the one whose output it reads (direct, traced) or "
        "the last one registered before it (registration, the originals)", choices=("direct", "registration")),
    Opt("include_bn_eps", bool, True, "sigma_k = sqrt(running_var + eps) (false: sqrt(running_var), the originals)"),
    Opt("u_sweep", bool, True, "also evaluate the masks of every u of the sweep on the test sets (analysis only)"),
    Opt("u_min", float, 0.0, "sweep grid: linspace(u_min, u_max, u_num)"),
    Opt("u_max", float, 10.0, "sweep grid: upper end"),
    Opt("u_num", int, 21, "sweep grid: number of values", check=in_range(1)),
    # BackdoorBench's training keys: CLP trains nothing and draws no data (yaml only, refused with a pointer)
    *(Opt(k, lambda v: v, None, "", cli=False) for k in ("epochs", "lr", "batch_size", "ratio", "index", "balanced")),
]
REFUSED = ("epochs", "lr", "batch_size", "ratio", "index", "balanced")
SPEC = {"tiny": {"u": 5.0}}     # BackdoorBench's tiny.yaml (spec §3.1); every other dataset: the defaults


# --- 1. pairing: which convolution scores which BatchNorm --------------------------------------------------------

def check_pair(bn_name, bn, conv_name, conv):
    if conv.out_channels != bn.num_features:
        raise UserError(f"BatchNorm {bn_name} ({bn.num_features} channels) is paired with convolution {conv_name} "
                        f"({conv.out_channels} output channels); use --pairing direct or a model whose BN follows "
                        "its convolution")
    if not bn.affine:
        raise UserError(f"BatchNorm {bn_name} has no affine weight and bias, so CLP cannot prune it by zeroing them; "
                        "CLP needs affine BatchNorm layers")


@torch.no_grad()
def trace_pairs(model, input_shape):
    """[(bn name, conv name)] where the BN's input *is* the convolution's output, on one eval-mode fp32 pass of an
    all-zero batch; and the BNs left unscored, with why. The recorded tensors stay referenced until the matching is
    done: ids of freed tensors are reused by later ones (a residual sum would match a freed conv output)."""
    names = {m: n for n, m in model.named_modules()}
    conv_out, bn_in = [], {}

    def on_conv(mod, inputs, out):
        conv_out.append((out, names[mod]))

    def on_bn(mod, inputs):
        if names[mod] in bn_in:
            raise UserError(f"BatchNorm {names[mod]} is called twice in one forward pass; CLP cannot score it")
        bn_in[names[mod]] = inputs[0]
    handles = [m.register_forward_hook(on_conv) for m in names if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_pre_hook(on_bn) for m in names if isinstance(m, nn.BatchNorm2d)]
    try:
        with eval_mode(model):
            model(torch.zeros(2, *input_shape, dtype=torch.float32, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    pairs, unscored = [], []
    for bn_name, t in bn_in.items():
        match = [c for out, c in conv_out if out is t]
        if match:
            pairs.append((bn_name, match[0]))
        else:
            unscored.append({"bn": bn_name, "why": "its input is not a convolution's output"})
    unscored += [{"bn": n, "why": "not called in the forward pass"} for m, n in names.items()
                 if isinstance(m, nn.BatchNorm2d) and n not in bn_in]
    return pairs, unscored


def registration_pairs(model):
    """The originals' rule: every BN with the last Conv2d registered before it."""
    pairs, unscored, last = [], [], None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = name
        elif isinstance(m, nn.BatchNorm2d):
            if last is None:
                unscored.append({"bn": name, "why": "no convolution registered before it"})
            else:
                pairs.append((name, last))
    return pairs, unscored


def find_pairs(model, input_shape, rule):
    pairs, unscored = trace_pairs(model, input_shape) if rule == "direct" else registration_pairs(model)
    modules = dict(model.named_modules())
    for b, c in pairs:
        check_pair(b, modules[b], c, modules[c])
    if not pairs:
        raise UserError("the model has no convolution followed by a BatchNorm layer, so CLP has nothing to score "
                        "(networks without BatchNorm are not supported)")
    paired = {c for _, c in pairs}
    no_bn = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and n not in paired]
    return pairs, unscored, no_bn


# --- 2. scores: UCLC_k = sigma_max(W_k reshaped C_in' x (kh kw)) * |gamma_k| / sigma_k ---------------------------

@torch.no_grad()
def uclc(conv, bn, include_eps=True, name="?"):
    """(spectral norms s_k, BN factors |gamma_k| / sigma_k, UCLC) in float64 on the CPU."""
    w = conv.weight.detach().to("cpu", torch.float64)
    s = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
    var = bn.running_var.detach().to("cpu", torch.float64)
    sigma = (var + bn.eps).sqrt() if include_eps else var.sqrt()
    factor = bn.weight.detach().to("cpu", torch.float64).abs() / sigma
    score = s * factor
    bad = (~torch.isfinite(score)).nonzero().flatten().tolist()
    if bad:
        raise UserError(f"BatchNorm {name}: channel {bad[0]} has a non-finite UCLC (running_var "
                        f"{var[bad[0]].item():g}); pass --include_bn_eps true")
    return s, factor, score


def layer_stats(score):
    """(mean, unbiased std) of one layer's scores (torch.std's correction), None for a one-channel layer."""
    if score.numel() < 2:
        return None
    return score.mean().item(), score.std().item()


def select(score, u):
    """P_b(u) = {k : UCLC_k > mean + u * std} (strict), ascending; [] for a one-channel layer."""
    st = layer_stats(score)
    if st is None:
        return []
    return (score > st[0] + u * st[1]).nonzero().flatten().tolist()


def z_bound(n):
    """The largest z-score one channel of n can reach (one at M, the rest at 0): (n - 1) / sqrt(n)."""
    return (n - 1) / n ** 0.5


def score_model(model, input_shape, cfg):
    """Every scored layer: {'bn', 'conv', 's', 'factor', 'uclc'}; plus the unscored BNs and convolutions."""
    pairs, unscored, no_bn = find_pairs(model, input_shape, cfg["pairing"])
    modules, layers = dict(model.named_modules()), []
    for b, c in pairs:
        s, f, score = uclc(modules[c], modules[b], cfg["include_bn_eps"], b)
        if score.numel() < 2:
            unscored.append({"bn": b, "why": "one channel: its std is undefined"})
            print(f"note: BatchNorm {b} has one channel; skipped")
            continue
        layers.append({"bn": b, "conv": c, "s": s, "factor": f, "uclc": score})
    return layers, unscored, no_bn


# --- 3. pruning: gamma_k = beta_k = 0, so channel k of the BN's output is 0 for every input -----------------------

@torch.no_grad()
def prune_(model, masks):
    """masks: {bn name: [channels]}; zeroes gamma and beta of those channels in place (running stats untouched)."""
    modules = dict(model.named_modules())
    for b, channels in masks.items():
        if channels:
            idx = torch.tensor(channels, dtype=torch.long, device=modules[b].weight.device)
            modules[b].weight[idx] = 0
            modules[b].bias[idx] = 0
    return model


def masks_at(layers, u):
    return {l["bn"]: select(l["uclc"], u) for l in layers}


def report(layers, unscored, no_bn, cfg):
    """pruned.json's content (deterministic: no timings)."""
    out = []
    for l in layers:
        mean, std = layer_stats(l["uclc"])
        z = (l["uclc"] - mean) / std if std > 0 else torch.zeros_like(l["uclc"])
        n = l["uclc"].numel()
        out.append({"bn": l["bn"], "conv": l["conv"], "channels": n, "mean": mean, "std": std,
                    "threshold": mean + cfg["u"] * std, "max_z": z.max().item(), "bound": z_bound(n),
                    "pruned_channels": select(l["uclc"], cfg["u"])})
    return {"u": cfg["u"], "pairing": cfg["pairing"], "include_bn_eps": cfg["include_bn_eps"], "layers": out,
            "bn_not_scored": unscored, "conv_not_scored": no_bn,
            "n_pruned": sum(len(l["pruned_channels"]) for l in out),
            "n_scored_channels": sum(l["channels"] for l in out)}


def uclc_csv(layers, pruned):
    lines = ["bn,conv,channel,spectral_norm,bn_factor,uclc,z,pruned\n"]
    for l, p in zip(layers, pruned["layers"]):
        mean, std, chosen = p["mean"], p["std"], set(p["pruned_channels"])
        for k in range(l["uclc"].numel()):
            z = (l["uclc"][k].item() - mean) / std if std > 0 else 0.0
            lines.append(f"{l['bn']},{l['conv']},{k},{l['s'][k].item():.10g},{l['factor'][k].item():.10g},"
                         f"{l['uclc'][k].item():.10g},{z:.10g},{int(k in chosen)}\n")
    return "".join(lines)


# --- 4. the logged sweep over u (analysis only: the result is the configured u) ----------------------------------

def sweep(layers, grid, evaluate):
    """One row per u of the grid; each distinct mask set is evaluated once, by evaluate(masks) -> metrics."""
    seen, rows = {}, []
    for u in grid:
        masks = masks_at(layers, u)
        key = tuple(tuple(v) for v in masks.values())
        if key not in seen:
            seen[key] = (len(seen), evaluate(masks))
        mask_id, m = seen[key]
        rows.append({"u": u, "n_pruned": sum(map(len, masks.values())),
                     **{f"n_pruned_{b}": len(v) for b, v in masks.items()},
                     **{k: m[k] for k in ("test_acc", "test_asr", "test_ra", "clean_test_loss", "bd_test_loss")},
                     "mask_id": mask_id})
    return rows


def sweep_files(rows, u):
    keys = list(rows[0])
    csv = "# analysis only: not used to choose u\n" + ",".join(keys) + "\n" + "".join(
        ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n" for r in rows)
    from utils.plots import _png, plt
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, label in (("test_acc", "ACC"), ("test_asr", "ASR"), ("test_ra", "RA")):
        ax.plot([r["u"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=label)
    ax.axvline(u, color="k", ls="--", lw=1, label=f"configured u = {u:g}")
    ax.set(xlabel="u", ylim=(-0.02, 1.02), title="CLP u sweep (analysis only: not used to choose u)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return csv, _png(fig)


# --- 5. the phase: score, prune, log the sweep ---------------------------------------------------------------------

def prune_phase(ctx, model, timing) -> Phase:
    cfg, shape = ctx.cfg, ctx.record.model_info["input_shape"]

    def step(_):
        t0 = time.time()
        layers, unscored, no_bn = score_model(model, shape, cfg)
        pruned = report(layers, unscored, no_bn, cfg)
        prune_(model, {p["bn"]: p["pruned_channels"] for p in pruned["layers"]})
        timing["score_seconds"] = round(time.time() - t0, 3)
        ctx.run.write_file("uclc.csv", uclc_csv(layers, pruned))
        ctx.run.write_file("pruned.json", json.dumps(pruned, indent=1) + "\n")
        for p in pruned["layers"]:
            print(f"{p['bn']} (with {p['conv']}): {p['channels']} channels, max z {p['max_z']:.2f} of at most "
                  f"{p['bound']:.2f}, pruned {p['pruned_channels']}")
        print(f"CLP u = {cfg['u']:g}: pruned {pruned['n_pruned']} of {pruned['n_scored_channels']} scored channels "
              f"in {len(layers)} layers; not scored: {len(unscored)} BN, {len(no_bn)} convolutions")
        if cfg["u_sweep"]:
            t1 = time.time()
            grid = torch.linspace(cfg["u_min"], cfg["u_max"], cfg["u_num"], dtype=torch.float64).tolist()
            rows = sweep(layers, grid, lambda m: ctx.evaluate(prune_(ctx.attacked_model(), m)))
            csv, png = sweep_files(rows, cfg["u"])
            ctx.run.write_file("u_sweep.csv", csv)
            ctx.run.write_file("u_sweep.png", png)
            print(f"u sweep: {len(grid)} values, {len({r['mask_id'] for r in rows})} distinct masks evaluated "
                  f"({time.time() - t1:.1f}s); analysis only: not used to choose u")
        return {"lr": None, "n_pruned": pruned["n_pruned"]}

    def evaluate():
        t0 = time.time()
        m = ctx.evaluate(ctx.precision.prepare_model(model))
        timing["eval_seconds"] = round(time.time() - t0, 3)
        return m
    return Phase("prune", 1, step, evaluate, label="after pruning, epoch", start=0)


@register("clp", "defense", paper="Zheng et al., ECCV 2022", needs=("trained_model",), options=OPTIONS,
          summary="Channel Lipschitzness-based Pruning: data-free, zero the BN channels whose Lipschitz upper bound "
                  "is an outlier of their layer")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("clp", OPTIONS, argv, __doc__, spec_for=lambda cfg, d: SPEC.get(d), dataset=dataset)
    for key in REFUSED:
        if cfg.pop(key) is not None:
            raise UserError(f"key '{key}' is not accepted by CLP: it is data-free and trains nothing (no clean subset, "
                            "no epochs); its only setting is u (evaluation uses eval_batch_size)")
    if cfg["u_min"] > cfg["u_max"]:
        raise UserError(f"u_min {cfg['u_min']} > u_max {cfg['u_max']}: the sweep grid needs u_min <= u_max")
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("clp", cfg, args)
    try:
        model, timing = copy.deepcopy(ctx.record.model).float().cpu().eval(), {}   # scored and pruned on the CPU
        ctx.run.update_meta(defender_data="none")
        rows = fit(ctx.run, prune_phase(ctx, model, timing), {"model": model})
        p = json.loads((ctx.run.path / "pruned.json").read_text())
        return finish_defense(ctx, rows, ctx.plain_payload(model), {
            "u": cfg["u"], "pairing": cfg["pairing"], "n_pruned": p["n_pruned"],
            "n_scored_channels": p["n_scored_channels"], "n_scored_layers": len(p["layers"]),
            "pruned_fraction": p["n_pruned"] / p["n_scored_channels"], "defender_data": "none", **timing})
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
