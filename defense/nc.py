"""Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor
Attacks in Neural Networks", IEEE S&P 2019; spec: docs/specs/nc.md).

A model-level detector, then a defense. For every class k NC searches the smallest trigger that sends clean images
to k: a mask m (H x W in (0, 1), shared by the channels) and a pattern p (C x H x W), stamped as (1 - m) x + m p,
optimised by Adam on the cross-entropy towards k plus cost * |m|, the cost raised while the attack succeeds and
lowered while it fails. A backdoor target needs a far smaller mask than the other classes: the MAD anomaly index of
the mask norms flags the classes whose norm is abnormally small (index > 2). A flagged class's recovered trigger
then repairs the model: unlearning (fine-tuning on the clean subset with a share of it stamped, true labels kept;
BackdoorBench's code) or pruning the last stage's channels the trigger excites most (the paper's other method).
Nothing flagged: the attacked model is kept, and the record says so.

    python defense/nc.py --result_file badnet_demo
    python defense/nc.py --result_file badnet_demo --yaml_path config/defense/nc/original.yaml   # the authors' search

Project decisions (spec §7): the search sees the defender's clean subset without augmentation (never test data),
one subset draw serves both stages, stamping uses the exact float mask and pattern, the fine-tuned model is the one
saved, the median averages the two middle values (`median_rule: lower` is BackdoorBench's torch.median), a class
that never reaches the success threshold keeps its last state, and classes are scanned one at a time (one
"epoch" of the reverse-engineer phase each, so --resume continues at the next class).
"""
import csv
import io
import json
import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors, save as save_tensors

from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.detection import detection_metrics
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.epoch import batch_indices, train_epoch_supervised
from utils.engine.evaluate import eval_mode
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import make_optimizer, make_scheduler, scheduler_step
from utils.errors import UserError, run_main
from utils.io import read_bytes, read_json
from utils.options import clean_subset_options, recipe_options
from utils.plots import _png, _show, plt
from utils.registry import register
from utils.seeding import generator
from utils.stages import Recorder, head_columns

OPTIONS = [
    *clean_subset_options(ratio=0.05),   # a uniform draw, as BackdoorBench's choose_index
    Opt("nc_batch_size", int, 256, "reverse-engineering batch (last batch of a pass partial)", check=in_range(1)),
    Opt("batches_per_epoch", int, None, "batches per reverse-engineering epoch, from a stream reshuffling the subset "
        "at every pass (none: one pass)", check=in_range(1)),
    Opt("nc_epoch", int, 80, "maximum reverse-engineering epochs per class", check=in_range(1)),
    Opt("mask_lr", float, 0.1, "Adam lr of mask and pattern (betas 0.5, 0.9)", check=in_range(0, lo_open=True)),
    Opt("init_cost", float, 1e-3, "initial cost of the mask norm", check=in_range(0, lo_open=True)),
    Opt("reset_cost_to_zero", bool, False, "start at cost 0, set init_cost after `patience` successes (authors)"),
    Opt("init", str, "constant", "latent start: constant 1 (BackdoorBench) or seeded uniform (authors)",
        choices=("constant", "random")),
    Opt("atk_succ_threshold", float, 0.98, "attack success an epoch must reach", check=in_range(0, 1)),
    Opt("patience", int, 5, "consecutive (un)successful epochs before the cost moves", check=in_range(1)),
    Opt("cost_multiplier", float, 2.0, "cost x mu up, / mu^1.5 down", check=in_range(1, lo_open=True)),
    Opt("early_stop", bool, True, "stop a class once its best norm stalls (after the cost moved both ways)"),
    Opt("early_stop_threshold", float, 0.99, "an epoch stalls when the best norm improved by less than this factor",
        check=in_range(0, 1)),
    Opt("early_stop_patience", int, 25, "stalled epochs before the early stop", check=in_range(1)),
    Opt("EPSILON", float, 1e-7, "epsilon of the tanh parametrisation", check=in_range(0)),
    Opt("use_norm", int, 1, "norm of the mask: 1 (L1) or 2 (L2)", choices=(1, 2)),
    Opt("median_rule", str, "mean", "even counts: average the middle values (np.median) or take the lower one "
        "(torch.median, BackdoorBench)", choices=("mean", "lower")),
    Opt("anomaly_threshold", float, 2.0, "a class is flagged when its anomaly index is strictly above this"),
    Opt("mitigation", str, "unlearning", "when a class is flagged: unlearning (BackdoorBench), pruning (the paper) "
        "or none (detection only)", choices=("unlearning", "pruning", "none")),
    Opt("force_mitigation", bool, False, "nothing flagged: mitigate the class of largest anomaly index anyway"),
    Opt("unlearning_ratio", float, 0.2, "share of the subset stamped with each flagged trigger", check=in_range(0, 1)),
    Opt("prune_step_ratio", float, 0.01, "pruning step: ceil(C * ratio) channels", check=in_range(0, 1, lo_open=True)),
    Opt("prune_stop_asr", float, 0.05, "prune until the recovered trigger's ASR on the subset is at most this",
        check=in_range(0, 1)),
    Opt("prune_finetune_epochs", int, 0, "fine-tuning epochs after pruning, pruned channels held at zero",
        check=in_range(0)),
    *recipe_options(epochs=100, batch_size=256, lr=0.01, drop_last=None),   # the unlearning fine-tuning (ft-bb)
    Opt("crop_padding", int, 4, "random-crop padding of the fine-tuning augmentation (0: none)", check=in_range(0)),
    Opt("hflip", bool, None, "random horizontal flip in fine-tuning (default: the dataset's rule)"),
    Opt("eval_every", int, 1, "test evaluation every N mitigation epochs (and after the last)", check=in_range(1)),
]
OUT = {"unlearning": "nc", "pruning": "nc-prune", "none": "nc-detect"}   # variants of one record do not collide


# --- 1. the trigger: parametrisation, stamping, one optimisation step --------------------------------------------

def to_unit_interval(theta, eps=1e-7):
    return torch.tanh(theta) / (2 + eps) + 0.5


def from_unit_interval(v, eps=1e-7):
    """The authors' inverse map, finite at 0 and 1."""
    return torch.atanh((v - 0.5) * (2 - eps))


def stamp(x, mask, pattern):
    """(1 - m) x + m p, m (H, W) or (1, H, W) broadcast over the channels: a convex combination, inside [0, 1]."""
    return (1 - mask) * x + mask * pattern


def stamp_uint8(x_uint8, mask, pattern):
    return torch.round(stamp(to_unit(x_uint8), mask, pattern) * 255).to(torch.uint8)


def mask_norm(mask, use_norm=1):
    return mask.sum() if use_norm == 1 else mask.pow(2).sum().sqrt()


def trigger_step(model, xb, k, theta, opt, cost, cfg):
    """One Adam step on the latents: L = mean CE(M(stamp(x)), k) + cost * |m|, m before the update. Returns L, CE,
    |m| and how many stamped images went to k (tensors, so the epoch reads the device once)."""
    mask, pattern = (to_unit_interval(t, cfg["EPSILON"]) for t in theta)
    logits = model(stamp(xb, mask, pattern))
    ce = F.cross_entropy(logits, torch.full((len(xb),), k, device=xb.device))
    reg = mask_norm(mask, cfg["use_norm"])
    loss = ce + cost * reg
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return torch.stack([loss.detach(), ce.detach(), reg.detach(), (logits.argmax(1) == k).sum().float()])


@contextmanager
def frozen(model):
    """Eval mode (BN statistics fixed) and no parameter gradients while the trigger is searched."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with eval_mode(model):
            yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


# --- 2. the cost schedule and the early stop (spec §5.1 step 4): a pure update of a small state ------------------

def new_schedule(cfg):
    return {"cost": 0.0 if cfg["reset_cost_to_zero"] else cfg["init_cost"], "set": 0, "up": 0, "down": 0,
            "up_flag": False, "down_flag": False, "best": math.inf, "es": 0, "es_ref": math.inf}


def end_of_epoch(s, asr, reg, cfg):
    """Update s after an epoch of attack success `asr` and mean norm `reg`. Returns (improved, event, stop)."""
    ok, p = asr >= cfg["atk_succ_threshold"], cfg["patience"]
    improved = ok and reg < s["best"]
    if improved:
        s["best"] = reg
    if cfg["early_stop"]:
        if s["best"] < math.inf:
            s["es"] = s["es"] + 1 if s["best"] >= cfg["early_stop_threshold"] * s["es_ref"] else 0
        s["es_ref"] = min(s["es_ref"], s["best"])
        if s["up_flag"] and s["down_flag"] and s["es"] >= cfg["early_stop_patience"]:
            return improved, "early_stop", True          # no cost change in the stopping epoch
    event = "none"
    if s["cost"] == 0 and ok:                            # reachable only with reset_cost_to_zero
        s["set"] += 1
        if s["set"] >= p:
            s.update(cost=cfg["init_cost"], up=0, down=0, up_flag=False, down_flag=False)
            event = "init"
    else:
        s["set"] = 0
    s["up"], s["down"] = (s["up"] + 1, 0) if ok else (0, s["down"] + 1)
    if s["up"] >= p:
        s.update(up=0, cost=s["cost"] * cfg["cost_multiplier"], up_flag=True)
        event = "up"
    elif s["down"] >= p:
        s.update(down=0, cost=s["cost"] / cfg["cost_multiplier"] ** 1.5, down_flag=True)
        event = "down"
    return improved, event, False


# --- 3. reverse engineering one class (spec §5.1) ----------------------------------------------------------------

def batch_stream(n, batch_size, gen, device):
    while True:   # a new permutation at every pass, last batch partial
        yield from batch_indices(n, batch_size, gen, device=device)


def reverse_engineer(model, x, k, cfg, seed=0):
    """Class k's smallest trigger from the clean images x (uint8, on the model's device). The batch stream restarts
    for every class, so results do not depend on the scanning order."""
    (n, c, h, w), dev, eps = x.shape, x.device, cfg["EPSILON"]
    if cfg["init"] == "constant":
        theta = [torch.ones(1, h, w, device=dev), torch.ones(c, h, w, device=dev)]
    else:
        g = generator(seed, f"nc-init:{k}")
        theta = [from_unit_interval(torch.rand(s, generator=g, dtype=torch.float64), eps).float().to(dev)
                 for s in ((1, h, w), (c, h, w))]   # float64: 2 - eps is 2 in float32, and artanh(-1) infinite
    theta = [t.requires_grad_() for t in theta]
    opt = torch.optim.Adam(theta, lr=cfg["mask_lr"], betas=(0.5, 0.9), eps=1e-8)
    stream = batch_stream(n, cfg["nc_batch_size"], generator(seed, "nc-order"), dev)
    per_epoch = cfg["batches_per_epoch"] or math.ceil(n / cfg["nc_batch_size"])
    s, best, log, stop = new_schedule(cfg), None, [], False
    with frozen(model):
        for epoch in range(1, cfg["nc_epoch"] + 1):
            sums, seen = torch.zeros(4, device=dev, dtype=torch.float64), 0
            for _ in range(per_epoch):
                idx = next(stream)
                sums += trigger_step(model, to_unit(x[idx]), k, theta, opt, s["cost"], cfg).double()
                seen += len(idx)
            loss, ce, reg, hits = sums.tolist()
            cost, asr = s["cost"], hits / seen
            improved, event, stop = end_of_epoch(s, asr, reg / per_epoch, cfg)
            with torch.no_grad():
                now = [to_unit_interval(t, eps).detach().clone() for t in theta]   # after the epoch's last update
            if improved:
                best = (*now, epoch, asr)
            log.append({"class": k, "epoch": epoch, "cost": cost, "asr": asr, "loss_ce": ce / per_epoch,
                        "loss_reg": reg / per_epoch, "loss": loss / per_epoch, "reg_best": s["best"], "event": event,
                        "early_stop_counter": s["es"]})
            if stop:
                break
    mask, pattern, best_epoch, best_asr = best if best is not None else (*now, None, None)
    return {"class": k, "mask": mask.reshape(h, w).cpu(), "pattern": pattern.cpu(),
            "norm": mask_norm(mask, cfg["use_norm"]).item(), "reached": best is not None, "epochs_run": epoch,
            "best_epoch": best_epoch, "early_stopped": stop, "final_cost": s["cost"], "best_reg": s["best"],
            "best_asr": best_asr, "log": log}


# --- 4. the anomaly index, the flagged classes (spec §5.2) -------------------------------------------------------

def median(v, rule="mean"):
    s = torch.sort(v).values
    lo, hi = s[(len(s) - 1) // 2], s[len(s) // 2]
    return lo if rule == "lower" else (lo + hi) / 2


def anomaly_index(norms, rule="mean"):
    """Signed a_k = (med - n_k) / MAD, MAD = 1.4826 median|n - med|: positive on the small-norm side. MAD 0 gives
    +-inf (or 0 at the median), never NaN. Returns (a, med, mad)."""
    n = torch.as_tensor(norms, dtype=torch.float64)
    med = median(n, rule)
    mad = 1.4826 * median((n - med).abs(), rule)
    if mad > 0:
        return (med - n) / mad, med.item(), mad.item()
    inf = torch.full_like(n, math.inf)
    return torch.where(n < med, inf, torch.where(n > med, -inf, 0.0)), med.item(), 0.0


def flagged_classes(a, norms, threshold=2.0):
    """Classes whose index is strictly above the threshold, by increasing norm (ties: class index)."""
    return [k for k in sorted(range(len(norms)), key=lambda k: (norms[k], k)) if a[k] > threshold]


def verdict(results, cfg, target):
    norms = [r["norm"] for r in results]
    a, med, mad = anomaly_index(norms, cfg["median_rule"])
    flags = flagged_classes(a, norms, cfg["anomaly_threshold"])
    forced = not flags and cfg["force_mitigation"]
    treat = sorted(flags) if flags else [int(a.argmax())] if forced else []
    return {"norms": norms, "a": a.tolist(), "median": med, "mad": mad, "flags": flags, "forced": forced,
            "treat": treat if cfg["mitigation"] != "none" else [], "target": target}


# --- 5. mitigation: the unlearning set (§5.3), pruning by the recovered trigger (§5.4) ---------------------------

def unlearning_set(x, y, triggers, ratio, gen):
    """The subset with a seeded share n_u = round(n * ratio) replaced, for each (mask, pattern), by its stamped copy
    with the true labels. Returns images (uint8), labels and which images are stamped."""
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    n_u = round(len(x) * ratio)
    keep, out = perm[:len(x) - n_u], perm[len(x) - n_u:]
    xs = torch.cat([x[keep]] + [stamp_uint8(x[out], m, p) for m, p in triggers])
    ys = torch.cat([y[keep]] + [y[out]] * len(triggers))
    stamped = torch.arange(len(xs), device=x.device) >= len(keep)
    return xs, ys, stamped


@torch.no_grad()
def last_stage(model, x_uint8, batch_size=512):
    """(stage name, mean output per channel over images and positions, pooled head features), eval mode, fp32."""
    name = list(model.stages())[-1]
    total, count, feats = 0, 0, []
    with eval_mode(model):
        for i in range(0, len(x_uint8), batch_size):
            with Recorder(model, [name]) as rec:
                feats.append(model.features(to_unit(x_uint8[i:i + batch_size])).float())
            z = rec[name].float()
            total, count = total + z.sum((0, 2, 3)), count + z.shape[0] * z.shape[2] * z.shape[3]
    return name, (total / count).cpu(), torch.cat(feats)


def channel_order(delta):
    """Channels by delta descending, the lower index first on ties."""
    return torch.sort(-delta, stable=True).indices


def prune_by_trigger(model, x, y, treat, triggers, cfg):
    """Channels ordered by how much more the recovered triggers excite them than clean images (ties: lower index),
    pruned by steps until the recovered triggers' ASR on the subset (images not of their class) is low enough."""
    stage, clean, f_clean = last_stage(model, x)
    _, trig, _ = last_stage(model, torch.cat([stamp_uint8(x, m, p) for m, p in triggers]))
    order = channel_order(trig - clean)
    feats = [(last_stage(model, stamp_uint8(x[y != k], m, p))[2], k) for k, (m, p) in zip(treat, triggers)]
    rows, step = [], math.ceil(len(clean) * cfg["prune_step_ratio"])
    for j in range(0, len(clean), step):
        cols = head_columns(model, len(clean), order[:j]).to(f_clean.device)
        pred = lambda f: model.head(f.masked_fill(cols, 0)).argmax(1)   # noqa: E731
        asr = max(((pred(f) == k).float().mean().item() for f, k in feats if len(f)), default=0.0)
        rows.append({"num_pruned": j, "recovered_asr": asr, "clean_subset_acc": (pred(f_clean) == y).float().mean()
                     .item(), "accepted": int(asr <= cfg["prune_stop_asr"])})
        if asr <= cfg["prune_stop_asr"]:
            break
    return {"stage": stage, "channels": len(clean), "pruned_channels": order[:j].tolist(), "log": rows,
            "delta": (trig - clean).tolist()}


# --- 6. the record: per-class results (resumable), tables, picture -----------------------------------------------

def save_results(run, results, **tensors):
    """nc_classes.json (scalars and epoch logs) and triggers.safetensors (exact masks and patterns, class order)."""
    run.write_file("triggers.safetensors", save_tensors({"masks": torch.stack([r["mask"] for r in results]),
                                                         "patterns": torch.stack([r["pattern"] for r in results]),
                                                         **tensors}))
    run.write_file("nc_classes.json", json.dumps({"classes": [{k: v for k, v in r.items() if k not in ("mask", "pattern")}
                                                              for r in results]}) + "\n")


def load_results(run):
    if not (run.path / "nc_classes.json").exists():
        return []
    results = read_json(run.path / "nc_classes.json", "record file")["classes"]
    t = load_tensors(read_bytes(run.path / "triggers.safetensors", "record file"))
    return [{**r, "mask": t["masks"][i], "pattern": t["patterns"][i]} for i, r in enumerate(results)]


def csv_text(rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def trigger_png(results, v, title=""):
    """Mask (grey, not rescaled), pattern and m * p per class; flagged classes framed in red, the target named.
    More than 20 classes: the 20 of largest index plus the target."""
    a, k_all = v["a"], range(len(results))
    show = sorted(set(sorted(k_all, key=lambda k: -a[k])[:20]) | ({v["target"]} if v["target"] is not None else set()))
    fig, axes = plt.subplots(3, len(show), figsize=(1.25 * len(show) + 0.6, 4.4), squeeze=False)
    for col, k in enumerate(show):
        m, p = results[k]["mask"][None], results[k]["pattern"]
        for row, img in enumerate((m, p, m * p)):
            _show(axes[row, col], img)
            for sp in axes[row, col].spines.values():
                sp.set(color="red", linewidth=2.5) if k in v["flags"] else sp.set(visible=False)
        axes[0, col].set_title(f"{k}{' target' if k == v['target'] else ''}\nn {v['norms'][k]:.1f}\na {a[k]:.2f}",
                               fontsize=7, color="red" if k in v["flags"] else "black")
    for row, name in enumerate(("mask", "pattern", "m * p")):
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def write_detection(ctx, results, v):
    t, a = v["target"], v["a"]
    ctx.run.write_file("nc_classes.csv", csv_text([{
        "class": r["class"], "l1_norm": r["norm"], "anomaly_index": a[k], "flagged": int(k in v["flags"]),
        "is_target": "" if t is None else int(k == t), **{f: r[f] for f in ("reached", "epochs_run", "best_epoch",
        "early_stopped", "final_cost", "best_reg", "best_asr", "seconds")}} for k, r in enumerate(results)]))
    ctx.run.write_file("nc_log.csv", csv_text([row for r in results for row in r["log"]]))
    save_results(ctx.run, results, norms=torch.tensor(v["norms"]), anomaly_index=torch.tensor(a))
    ctx.run.write_file("trigger_recovered.png", trigger_png(results, v, f"Neural Cleanse on {ctx.record.path.name}: "
                       f"flagged {v['flags'] or 'none'}, max anomaly index {max(a):.2f}"))


def detection_summary(v, results, is_clean):
    t, a, flags = v["target"], v["a"], v["flags"]
    out = {"nc_max_anomaly_index": max(a), "nc_target_anomaly_index": math.nan if t is None else a[t],
           "nc_model_flagged": bool(flags), "nc_flagged_classes": flags,
           "median": v["median"], "mad": v["mad"], "mad_zero": v["mad"] == 0, "l1_norms": v["norms"],
           "anomaly_index": a, "true_target": t, "is_clean_model": is_clean,
           "target_rank": None if t is None else 1 + sum(a[k] > a[t] for k in range(len(a)) if k != t),
           "target_margin": None if t is None else a[t] - max(a[k] for k in range(len(a)) if k != t),
           "classes_not_reached": [r["class"] for r in results if not r["reached"]]}
    if t is not None:   # class level: the target the one positive, the anomaly index the score
        out.update(detection_metrics(a, [k == t for k in range(len(a))], [k in flags for k in range(len(a))],
                                     prefix="nc_class_"))
    return out


# --- 7. the phases: one class per epoch, then the mitigation -----------------------------------------------------

def reverse_phase(ctx, model, x, results) -> Phase:
    k_all = ctx.data.num_classes

    def step(k):
        t0 = time.time()
        r = reverse_engineer(model, x, k, ctx.cfg, ctx.cfg["random_seed"])
        r["seconds"] = round(time.time() - t0, 3)
        del results[k:]          # a class redone after a kill replaces its earlier copy
        results.append(r)
        save_results(ctx.run, results)
        return {"lr": None, "l1_norm": r["norm"], "best_asr": r["best_asr"], "epochs_run": r["epochs_run"],
                "reached": int(r["reached"]), "early_stopped": int(r["early_stopped"])}
    return Phase("reverse-engineer", k_all, step, lambda: ctx.evaluate(model), label="class", start=0,
                 eval_every=k_all, setup=lambda: results.extend(load_results(ctx.run)), show=("l1_norm",))


def mitigation_phase(ctx, model, x, y, state, target) -> Phase:
    cfg, opt, sched, pruning = ctx.cfg, state["optimizer"], state["scheduler"], ctx.cfg["mitigation"] == "pruning"
    hflip = ctx.record.dataset.info.hflip if cfg["hflip"] is None else cfg["hflip"]
    augment = lambda b: random_crop_flip(b, state["aug_gen"].gen, cfg["crop_padding"], hflip)   # noqa: E731
    work = {}

    def keep_zero(cols):
        @torch.no_grad()
        def zero():
            model.head.weight[:, cols.to(model.head.weight.device)] = 0
        work["after_step"] = zero

    def setup():
        results = load_results(ctx.run)
        v = verdict(results, cfg, target)
        if not v["treat"]:
            ph.epochs = 0        # nothing flagged: fit's loop (bounded after setup) runs no epoch
            return
        work["treat"] = v["treat"]
        work["triggers"] = [(results[k]["mask"].to(x.device), results[k]["pattern"].to(x.device)) for k in v["treat"]]
        if pruning:
            work["train"] = (x, y, torch.zeros(len(y), dtype=torch.bool, device=x.device))
            if (ctx.run.path / "pruned.json").exists():   # resumed inside the fine-tuning
                p = read_json(ctx.run.path / "pruned.json", "record file")
                keep_zero(head_columns(model, p["channels"], p["pruned_channels"]))
        else:
            work["train"] = unlearning_set(x, y, work["triggers"], cfg["unlearning_ratio"],
                                           generator(cfg["random_seed"], "nc-unlearning-split"))

    def train_epoch(epoch):
        if pruning and epoch == 1:
            p = prune_by_trigger(model, x, y, work["treat"], work["triggers"], cfg)
            cols = head_columns(model, p["channels"], p["pruned_channels"])
            keep_zero(cols)
            work["after_step"]()
            ctx.run.write_file("prune_log.csv", csv_text(p.pop("log")))
            ctx.run.write_file("pruned.json", json.dumps(p) + "\n")
            print(f"{p['stage']}: pruned {len(p['pruned_channels'])} of {p['channels']} channels")
            return {"lr": None, "num_pruned": len(p["pruned_channels"])}
        xs, ys, stamped = work["train"]
        lr = opt.param_groups[0]["lr"]
        stats, order, preds = train_epoch_supervised(model, xs, ys, opt, ctx.precision, state["shuffle_gen"].gen,
                                                     cfg["batch_size"], False, augment, desc=f"nc {epoch}",
                                                     after_step=work.get("after_step"))
        scheduler_step(sched, stats["train_loss"])
        hit, st = preds == ys[order], stamped[order]
        return {"lr": lr, **stats, "train_acc_clean_only": hit[~st].float().mean().item(),
                "train_acc_stamped": hit[st].float().mean().item() if st.any() else None}
    epochs = 1 + cfg["prune_finetune_epochs"] if pruning else cfg["epochs"]
    ph = Phase("mitigation", epochs, train_epoch, lambda: ctx.evaluate(model), eval_every=cfg["eval_every"],
               setup=setup)
    return ph


def spec_for(cfg, dataset):
    """The spec's per-dataset values (§3.2): what config/defense/nc/<dataset>.yaml sets without a deviation."""
    if dataset in ("mnist", "fashion_mnist"):
        return {"nc_batch_size": 128, "batches_per_epoch": 8}
    return {"epochs": 200, "lr_scheduler": "ReduceLROnPlateau"} if dataset == "tiny" else {}


@register("nc", "defense", paper="Wang et al., IEEE S&P 2019", needs=("trained_model", "clean_subset"),
          options=OPTIONS, summary="Neural Cleanse: reverse-engineer a minimal trigger per class, flag small-norm "
          "outliers (MAD), unlearn the recovered trigger")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    return defense_config("nc", OPTIONS, argv, __doc__, spec_for=spec_for, dataset=dataset)


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("nc", cfg, args, out_name=OUT[cfg["mitigation"]])
    try:
        x, y, _ = ctx.clean_subset(cfg["ratio"], False, cfg["index"])
        if ctx.run.meta.get("clean_subset", {}).get("source") == "unpoisoned":
            print("note: no reserve: the clean subset consists of images the attacker trained on")
        poison = ctx.record.poison
        target = int(poison["attack_target"]) if poison["attack_label_trans"] == "all2one" else None
        model, results = ctx.attacked_model(), []
        opt = make_optimizer(model.parameters(), cfg)
        state = {"model": model, "optimizer": opt, "scheduler": make_scheduler(opt, cfg), "precision": ctx.precision,
                 "shuffle_gen": GeneratorState(generator(cfg["random_seed"], "shuffle")),
                 "aug_gen": GeneratorState(generator(cfg["random_seed"], "augmentation"))}
        phases = [reverse_phase(ctx, model, x, results)]
        if cfg["mitigation"] != "none":
            phases.append(mitigation_phase(ctx, model, x, y, state, target))
        rows = fit(ctx.run, phases, state)
        results, n_classes = load_results(ctx.run), ctx.data.num_classes
        v = verdict(results, cfg, target)
        write_detection(ctx, results, v)
        print(f"anomaly index: max {max(v['a']):.3f}" + ("" if target is None else f", target {target}: "
              f"{v['a'][target]:.3f}") + f"; flagged {v['flags'] or 'none'}"
              + (f"; mitigated {v['treat']}" if v["treat"] else "; the model is left unchanged"))
        pruned = read_json(ctx.run.path / "pruned.json", "record file") if v["treat"] and cfg["mitigation"] == \
            "pruning" else None
        reverse = sum(r["seconds"] for r in results)
        extra = {**detection_summary(v, results, len(poison["poison_indices"]) <= 1),
                 "anomaly_threshold": cfg["anomaly_threshold"], "median_rule": cfg["median_rule"],
                 "mitigation": cfg["mitigation"], "mitigated": bool(v["treat"]), "forced": v["forced"],
                 "mitigated_classes": v["treat"],
                 "n_unlearn_stamped": round(len(y) * cfg["unlearning_ratio"]) * len(v["treat"])
                 if cfg["mitigation"] == "unlearning" else 0,
                 "pruned_channels": pruned["pruned_channels"] if pruned else None, "reverse_seconds": round(reverse, 2),
                 "seconds_per_class": round(reverse / n_classes, 2),
                 "mitigation_seconds": round(sum(r["seconds"] for r in rows[n_classes:]), 2)}
        curve = [{**rows[n_classes - 1], "epoch": 0}] + rows[n_classes:]   # the attacked model, then mitigation
        return finish_defense(ctx, curve, ctx.plain_payload(model), extra)
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
