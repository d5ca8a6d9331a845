"""STRIP (Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence Against Trojan Attacks on Deep Neural
Networks", ACSAC 2019, arXiv 1902.06531; spec: docs/specs/strip.md).

A triggered input keeps its prediction whatever is superimposed on it; a clean input's prediction scatters. STRIP
blends each input with N clean images, takes the mean entropy of the N predictions, and rejects the inputs whose
entropy lies below a boundary fitted on clean data at a preset false-rejection rate. The model is left as it is:
the defended system is the model behind the filter, and a rejected input gets no prediction.

    python defense/strip.py --result_file badnet_demo

Project decisions (spec §7): the paper's additive blend without clamping (BackdoorBench's normalised-space sum and a
convex blend as options); N distinct overlays per input from a pool disjoint from the calibration set; the clean and
the triggered version of a test image meet the same overlays; the paper's normal fit at 1 % FRR (BackdoorBench's
empirical quantile as an option); fp32 scoring; exact entropy in bits. ACC / ASR / RA count a rejected input as
no prediction (full denominators), so DER compares the filter with the purifying defenses on the same sets.
"""
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.detection import detection_metrics, roc_auc
from utils.engine.augment import to_unit
from utils.engine.epoch import progress
from utils.engine.evaluate import eval_mode, predict, prediction_breakdown
from utils.engine.loop import Phase, fit
from utils.errors import UserError, run_main
from utils.io import read_json
from utils.options import clean_subset_options
from utils.registry import register
from utils.seeding import generator


def fractions(v):
    """'0.01,0.05' or a YAML list -> [0.01, 0.05], each in (0, 1)."""
    items = v if isinstance(v, (list, tuple)) else [s for s in str(v).replace(" ", "").split(",") if s]
    out = [float(s) for s in items]
    if not all(0 < f < 1 for f in out):
        raise ValueError("expected fractions in (0, 1), e.g. 0.01,0.05")
    return out


OPTIONS = [
    *clean_subset_options(ratio=0.05, balanced=True),
    Opt("calib_fraction", float, 0.5, "share of each class of the clean subset that calibrates the boundary (the "
        "rest is the overlay pool); 0: the pool calibrates too (BackdoorBench)", check=in_range(0, 1, hi_open=True)),
    Opt("strip_n", int, 100, "N: superimposed images per input", check=in_range(1)),
    Opt("replace", bool, False, "draw the N overlays with replacement (the authors' notebook) instead of N distinct"),
    Opt("blend", str, "add", "superimposition: add (x + o, the paper), backdoorbench (its sum of normalised "
        "tensors), convex (alpha x + (1 - alpha) o)", choices=("add", "backdoorbench", "convex")),
    Opt("strip_alpha", float, 1.0, "overlay weight of `backdoorbench`, the input's weight of `convex`",
        check=in_range(0)),
    Opt("entropy_base", str, "2", "entropy in bits (2, the paper) or nats (e, BackdoorBench)", choices=("2", "e")),
    Opt("threshold_rule", str, "normal", "normal: the paper's normal fit of the calibration entropies; quantile: "
        "BackdoorBench's empirical quantile", choices=("normal", "quantile")),
    Opt("defense_fpr", float, 0.01, "preset false-rejection rate of clean inputs", check=in_range(0, 1, True, True)),
    Opt("fpr_grid", fractions, [0.005, 0.01, 0.02, 0.05, 0.1], "further operating points reported"),
    Opt("fp32_scores", bool, True, "score in fp32 whatever --amp says (near-certain predictions need it)"),
    Opt("n_test_clean", int, None, "score a seeded subset of this many clean test inputs (default: all)",
        check=in_range(1)),
    Opt("n_test_bd", int, None, "score a seeded subset of this many poisoned test inputs (default: all)",
        check=in_range(1)),
]

CHUNK_ROWS = 1024   # rows of overlay indices drawn at a time: fixed, so the draw never depends on a batch size


# --- 1. the defender's data: overlay pool and calibration set -------------------------------------------------

def split_pool_calib(y: torch.Tensor, calib_fraction: float):
    """Positions (into the clean subset) of the pool and the calibration set: of each class's n_c samples, in
    subset order, the first n_c - floor(n_c f) go to the pool, the rest calibrate; f = 0: the pool calibrates."""
    pool, calib = [], []
    for c in torch.unique(y).tolist():
        pos = torch.nonzero(y == c).flatten()
        k = len(pos) - math.floor(len(pos) * calib_fraction)
        pool.append(pos[:k])
        calib.append(pos[k:] if calib_fraction > 0 else pos)
    return torch.sort(torch.cat(pool)).values, torch.sort(torch.cat(calib)).values


def overlay_rows(rows: int, pool_size: int, n: int, replace: bool, gen: torch.Generator) -> torch.Tensor:
    """rows x n pool positions: without replacement the n smallest of pool_size uniform keys (a uniformly random
    n-subset), with replacement n independent uniform positions."""
    if not replace and n > pool_size:
        raise UserError(f"strip_n {n} distinct overlays per input, but the pool holds {pool_size} images: lower "
                        "--strip_n, raise --ratio or lower --calib_fraction, or pass --replace true")
    out = []
    for start in range(0, rows, CHUNK_ROWS):
        r = min(CHUNK_ROWS, rows - start)
        if replace:
            out.append(torch.randint(pool_size, (r, n), generator=gen))
        else:
            out.append(torch.rand(r, pool_size, generator=gen).topk(n, dim=1, largest=False).indices)
    return torch.cat(out) if out else torch.empty(0, n, dtype=torch.int64)


# --- 2. superimposition and entropy ---------------------------------------------------------------------------

def superimpose(x, o, mode: str, alpha: float, mean: torch.Tensor):
    """x (..., C, H, W) and overlays o in [0, 1]; never clamped (the originals' sums leave [0, 1]).
    backdoorbench: the pixel-space input whose normalisation is n(x) + alpha n(o), i.e. x + alpha (o - m)."""
    if mode == "add":
        return x + o
    if mode == "backdoorbench":
        return x + alpha * (o - mean.view(-1, 1, 1))
    return alpha * x + (1 - alpha) * o


def entropy(logits: torch.Tensor, base: str) -> torch.Tensor:
    """-sum_k q_k log_b q_k per row, from log_softmax (a zero probability contributes 0, no epsilon)."""
    logq = F.log_softmax(logits.float(), dim=-1)
    h = -(logq.exp() * logq).nan_to_num(0.0).sum(-1)
    return h / math.log(2) if base == "2" else h


@torch.no_grad()
def strip_entropies(model, x_uint8, pool_unit, rows, cfg, mean, target, precision):
    """For every input its mean entropy over its N blends (rows: its overlay positions), their std, the largest
    share of the N blends given one class and the share given the attack's target. One forward pass per chunk of
    eval_batch_size // N inputs; reduced on the device."""
    n = rows.shape[1]
    b = max(1, cfg["eval_batch_size"] // n)
    use_amp = not cfg["fp32_scores"]
    out = {k: [] for k in ("entropy", "entropy_std", "top_share", "target_share")}
    with eval_mode(model):
        for i in progress(range(0, len(x_uint8), b), "strip", total=math.ceil(len(x_uint8) / b)):
            x = to_unit(x_uint8[i:i + b])
            z = superimpose(x[:, None], pool_unit[rows[i:i + b].to(pool_unit.device)], cfg["blend"],
                            cfg["strip_alpha"], mean).flatten(0, 1)
            with (precision.autocast() if use_amp else torch.autocast(z.device.type, enabled=False)):
                logits = model(precision.prepare_input(z)).float()
            h = entropy(logits, cfg["entropy_base"]).view(len(x), n)
            pred = logits.argmax(1).view(len(x), n)
            counts = F.one_hot(pred, logits.shape[1]).sum(1)
            out["entropy"].append(h.mean(1))
            out["entropy_std"].append(h.std(1, correction=0))
            out["top_share"].append(counts.max(1).values.float() / n)
            out["target_share"].append((pred == target).float().mean(1) if target is not None
                                       else torch.full((len(x),), float("nan"), device=x.device))
    return {k: torch.cat(v).cpu().double() for k, v in out.items()}


# --- 3. the boundary, from the calibration set only ------------------------------------------------------------

def boundary(h_calib: torch.Tensor, rule: str, fpr: float) -> dict:
    """normal: tau = mu + sigma * Phi^-1(fpr) with the maximum-likelihood fit (divisor n), flag H <= tau.
    quantile: tau = the floor(fpr n)-th smallest entropy (0-based), flag H < tau."""
    h = h_calib.double()
    mu, sigma = h.mean().item(), h.std(correction=0).item()
    skew = (((h - mu) / sigma) ** 3).mean().item() if sigma > 0 else float("nan")
    if rule == "normal":
        if sigma == 0:
            raise UserError("every calibration input has the same entropy: the model or the overlay pool is "
                            "degenerate, and no normal fit exists (try --threshold_rule quantile)")
        tau = mu + sigma * statistics.NormalDist().inv_cdf(fpr)
    else:
        tau = torch.sort(h).values[math.floor(fpr * len(h))].item()
    return {"tau": tau, "mu": mu, "sigma": sigma, "skew": skew, "rule": rule, "fpr": fpr}


def flag(h: torch.Tensor, b: dict) -> torch.Tensor:
    return h <= b["tau"] if b["rule"] == "normal" else h < b["tau"]


# --- 4. the defended system: rejected inputs get no prediction -------------------------------------------------

def after_rejection(pred_c, y_c, flag_c, pred_b, y_b, y_true_b, flag_b, num_classes) -> dict:
    """ACC, ASR, RA over the full test sets with a rejected input counted as no prediction (so ASR, RA, other and
    rejected sum to 1), the breakdown of the accepted poisoned predictions, and the kept-set (conditional) figures."""
    acc_c, acc_b = ~flag_c, ~flag_b
    nan = float("nan")

    def share(mask, over):
        return (mask & over).double().sum().item() / max(len(over), 1)

    def kept(mask, over):
        return (mask & over).double().sum().item() / over.sum().item() if over.any() else nan
    asr, ra = pred_b == y_b, pred_b == y_true_b
    bd = prediction_breakdown(pred_b[acc_b], y_b[acc_b], y_true_b[acc_b], num_classes)
    n_b = max(len(pred_b), 1)
    scale = acc_b.sum().item() / n_b     # the breakdown's shares over the accepted inputs -> over all inputs
    per_class = ";".join(f"{float(v) * scale:.6g}" for v in bd["bd_pred_per_class"].split(";"))
    return {"test_acc": share(pred_c == y_c, acc_c), "test_asr": share(asr, acc_b), "test_ra": share(ra, acc_b),
            "test_other": bd["test_other"] * scale, "test_top_wrong_class": bd["test_top_wrong_class"],
            "test_top_wrong": bd["test_top_wrong"] * scale, "bd_pred_per_class": per_class,
            "test_rejected": flag_b.double().mean().item(), "kept_acc": kept(pred_c == y_c, acc_c),
            "kept_asr": kept(asr, acc_b), "kept_ra": kept(ra, acc_b)}


def operating_point(h_calib, h_c, h_b, pred, labels, fpr, rule, num_classes) -> dict:
    """The boundary re-fitted from the calibration set at one preset FRR, and what it gives on the test sets."""
    b = boundary(h_calib, rule, fpr)
    f_c, f_b = flag(h_c, b), flag(h_b, b)
    tp, fp = int(f_b.sum()), int(f_c.sum())
    prec = tp / (tp + fp) if tp + fp else float("nan")
    rec = tp / max(len(f_b), 1)
    figures = after_rejection(pred["clean"], labels["y_c"], f_c, pred["bd"], labels["y_b"], labels["y_true_b"], f_b,
                              num_classes)
    return {"defense_fpr": fpr, "tau": b["tau"], "calib_frr": flag(h_calib, b).double().mean().item(),
            "test_frr": fp / max(len(f_c), 1), "recall": rec, "far": 1 - rec, "precision": prec,
            "f1": 2 * prec * rec / (prec + rec) if prec == prec and prec + rec > 0 else float("nan"),
            **{k: figures[k] for k in ("test_acc", "test_asr", "test_ra", "kept_acc", "kept_asr", "kept_ra")}}


# --- 5. the run: one scoring step, its files ------------------------------------------------------------------

def test_subset(n_total: int, cap, seed: int, name: str) -> torch.Tensor:
    if cap is None or cap >= n_total:
        return torch.arange(n_total)
    return torch.sort(torch.randperm(n_total, generator=generator(seed, name))[:cap]).values


def score_phase(ctx, model, x_sub, y_sub, sub_idx) -> Phase:
    cfg, data, sets = ctx.cfg, ctx.data, ctx.eval_sets
    target = ctx.record.poison["attack_target"] if ctx.record.poison["attack_label_trans"] == "all2one" else None
    mean = torch.tensor(ctx.record.dataset.info.mean, device=ctx.device)
    k = data.num_classes

    def step(_):
        t0 = time.time()
        pool_pos, calib_pos = split_pool_calib(y_sub.cpu(), cfg["calib_fraction"])
        pool = to_unit(x_sub[pool_pos.to(x_sub.device)])
        seed, n = cfg["random_seed"], cfg["strip_n"]
        rows_calib = overlay_rows(len(calib_pos), len(pool), n, cfg["replace"], generator(seed, "strip_overlay_calib"))
        # one row per clean test position; a poisoned test image uses the row of the clean image it was made from
        rows_test = overlay_rows(len(sets.y_test), len(pool), n, cfg["replace"], generator(seed, "strip_overlay_test"))
        keep_c = test_subset(len(sets.y_test), cfg["n_test_clean"], seed, "strip_test_clean")
        keep_b = test_subset(len(sets.y_bd), cfg["n_test_bd"], seed, "strip_test_bd")
        bd_pos = data.bd_test_indices[keep_b]
        h_calib = strip_entropies(model, x_sub[calib_pos.to(x_sub.device)], pool, rows_calib, cfg, mean, target,
                                  ctx.precision)
        t_calib = time.time() - t0
        kc, kb = keep_c.to(ctx.device), keep_b.to(ctx.device)
        s_c = strip_entropies(model, sets.x_test[kc], pool, rows_test[keep_c], cfg, mean, target, ctx.precision)
        s_b = strip_entropies(model, sets.x_bd[kb], pool, rows_test[bd_pos], cfg, mean, target, ctx.precision)
        fp32 = ctx.precision if not cfg["fp32_scores"] else type(ctx.precision)(ctx.device, False, False)
        pred = {"clean": predict(model, sets.x_test[kc], fp32, cfg["eval_batch_size"])[0].cpu(),
                "bd": predict(model, sets.x_bd[kb], fp32, cfg["eval_batch_size"])[0].cpu()}
        labels = {"y_c": sets.y_test[kc].cpu(), "y_b": sets.y_bd[kb].cpu(), "y_true_b": sets.y_bd_true[kb].cpu()}
        b = boundary(h_calib["entropy"], cfg["threshold_rule"], cfg["defense_fpr"])
        if b["rule"] == "normal" and b["tau"] <= 0:
            print(f"warning: the boundary {b['tau']:.4g} is not above 0: no input can be flagged at "
                  f"defense_fpr {cfg['defense_fpr']}")
        f_calib, f_c, f_b = flag(h_calib["entropy"], b), flag(s_c["entropy"], b), flag(s_b["entropy"], b)
        if not f_calib.any():
            print("warning: no calibration input lies beyond the boundary (calibration FRR 0)")
        seconds_test = time.time() - t0 - t_calib
        result = outcome(ctx, b, h_calib, s_c, s_b, f_calib, f_c, f_b, pred, labels, target, k)
        result.update(seconds_calib=round(t_calib, 3), seconds_test=round(seconds_test, 3),
                      images_per_second=n * (len(calib_pos) + len(kc) + len(kb)) / max(time.time() - t0, 1e-9))
        write_files(ctx, b, sub_idx, pool_pos, calib_pos, keep_c, keep_b, h_calib, s_c, s_b, f_calib, f_c, f_b, pred,
                    labels, result)
        print(f"strip: boundary {b['tau']:.4f} ({b['rule']}, calibration mean {b['mu']:.4f}, std {b['sigma']:.4f}); "
              f"AUROC {result['det_auroc']:.4f}, TPR@5%FPR {result['det_tpr_at_fpr_0.05']:.4f}, recall "
              f"{result['det_recall']:.4f} at test FRR {result['det_fpr']:.4f}")
        return {"lr": None, "train_loss": None, "train_acc": None,
                **after_rejection(pred["clean"], labels["y_c"], f_c, pred["bd"], labels["y_b"], labels["y_true_b"],
                                  f_b, k)}
    return Phase("score", 1, step, dict, label="scoring, step", start=0, eval_every=0)


def outcome(ctx, b, h_calib, s_c, s_b, f_calib, f_c, f_b, pred, labels, target, k) -> dict:
    """The summary's detection figures: threshold-free (negatives: clean test inputs, positives: poisoned ones,
    score -entropy) and at the boundary."""
    scores = torch.cat([-s_c["entropy"], -s_b["entropy"]])
    is_bd = torch.cat([torch.zeros(len(f_c), dtype=torch.bool), torch.ones(len(f_b), dtype=torch.bool)])
    det = detection_metrics(scores, is_bd, torch.cat([f_c, f_b]))
    effective = pred["bd"] == labels["y_b"]        # the poisoned inputs the unfiltered model sends to the target
    eff = torch.cat([torch.ones(len(f_c), dtype=torch.bool), effective])
    per_class = [f_c[labels["y_c"] == c].double().mean().item() if (labels["y_c"] == c).any() else float("nan")
                 for c in range(k)]
    grid = sorted({*ctx.cfg["fpr_grid"], ctx.cfg["defense_fpr"]})
    points = [operating_point(h_calib["entropy"], s_c["entropy"], s_b["entropy"], pred, labels, f, b["rule"], k)
              for f in grid]
    return {**det, "det_auroc_effective": roc_auc(scores[eff], is_bd[eff]),
            "det_recall_effective": f_b[effective].double().mean().item() if effective.any() else float("nan"),
            "threshold": b["tau"], "threshold_rule": b["rule"], "defense_fpr": b["fpr"], "calib_mean": b["mu"],
            "calib_std": b["sigma"], "calib_skew": b["skew"], "calib_frr": f_calib.double().mean().item(),
            "test_frr_per_class": per_class, "entropy_clean_median": s_c["entropy"].median().item(),
            "entropy_bd_median": s_b["entropy"].median().item(), "min_clean_entropy": s_c["entropy"].min().item(),
            "max_bd_entropy": s_b["entropy"].max().item(),
            "entropy_gap": s_c["entropy"].min().item() - s_b["entropy"].max().item(),
            "strip_n": ctx.cfg["strip_n"], "entropy_base": ctx.cfg["entropy_base"],
            "log_num_classes": math.log(k, 2 if ctx.cfg["entropy_base"] == "2" else math.e),
            "ra_note": "a rejected input has no prediction: RA can only fall, so RIR <= 0.5 by construction",
            "operating_points": points}


def write_files(ctx, b, sub_idx, pool_pos, calib_pos, keep_c, keep_b, h_calib, s_c, s_b, f_calib, f_c, f_b, pred,
                labels, result):
    import pandas as pd
    from utils.plots import score_histogram
    run, cfg = ctx.run, ctx.cfg
    pool_idx, calib_idx = sub_idx[pool_pos.cpu()], sub_idx[calib_pos.cpu()]
    run.write_file("pool_index.txt", "".join(f"{i}\n" for i in pool_idx.tolist()))
    run.write_file("calib_index.txt", "".join(f"{i}\n" for i in calib_idx.tolist()))
    run.write_file("detector.json", json.dumps({
        "blend": cfg["blend"], "strip_alpha": cfg["strip_alpha"], "strip_n": cfg["strip_n"], "replace": cfg["replace"],
        "entropy_base": cfg["entropy_base"], **b, "pool_size": len(pool_pos), "calib_size": len(calib_pos),
        "pool_index": "pool_index.txt", "calib_index": "calib_index.txt", "seed": cfg["random_seed"],
        "generators": ["strip_overlay_calib", "strip_overlay_test"], "num_classes": ctx.data.num_classes}, indent=1))
    nan = torch.full((len(calib_pos),), -1, dtype=torch.int64)
    parts = [("calib", calib_idx, h_calib, f_calib, nan, ctx.data.y_train_true[calib_idx], nan),
             ("clean_test", keep_c, s_c, f_c, pred["clean"], labels["y_c"], labels["y_c"]),
             ("bd_test", keep_b, s_b, f_b, pred["bd"], labels["y_b"], labels["y_true_b"])]
    frames = [pd.DataFrame({"set": name, "index": idx.numpy(), "entropy": s["entropy"].numpy(),
                            "score": (-s["entropy"]).numpy(), "entropy_std": s["entropy_std"].numpy(),
                            "top_share": s["top_share"].numpy(), "target_share": s["target_share"].numpy(),
                            "flagged": f.int().numpy(), "pred": p.numpy(), "label": y.numpy(), "true_label": t.numpy()})
              for name, idx, s, f, p, y, t in parts]
    run.write_file("scores.csv", pd.concat(frames).to_csv(index=False, float_format="%.8g"))
    det = pd.concat(frames[1:])
    run.write_file("detection_scores.csv", pd.DataFrame({
        "score": det["score"], "label": (det["set"] == "bd_test").astype(int), "flagged": det["flagged"]}
    ).to_csv(index=False, float_format="%.8g"))
    run.write_file("operating_points.csv", pd.DataFrame(result["operating_points"]).to_csv(index=False,
                                                                                            float_format="%.6g"))
    run.write_file("strip.json", json.dumps(result, indent=1, default=float))
    unit = "bits" if cfg["entropy_base"] == "2" else "nats"
    run.write_file("entropy_hist.png", score_histogram(
        {"clean test": s_c["entropy"], "poisoned test": s_b["entropy"]}, h_calib["entropy"], b["tau"],
        f"STRIP on {ctx.record.path.name}: mean entropy of {cfg['strip_n']} blends", f"entropy ({unit})"))


@register("strip", "defense", paper="Gao et al., ACSAC 2019", needs=("trained_model", "clean_subset"),
          options=OPTIONS, summary="STRIP: reject inputs whose predictions stay certain under superimposed clean "
          "images (low mean entropy)")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    return defense_config("strip", OPTIONS, argv, __doc__, dataset=dataset)


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("strip", cfg, args)
    try:
        x, y, idx = ctx.clean_subset(cfg["ratio"], cfg["balanced"], cfg["index"])
        model = ctx.attacked_model()
        rows = fit(ctx.run, score_phase(ctx, model, x, y, idx), {})
        result = read_json(ctx.run.path / "strip.json", "record file")
        result.pop("operating_points")
        return finish_defense(ctx, rows, None, {**result, "clean_subset_size": len(idx)},
                              carry=("test_rejected", "kept_acc", "kept_asr", "kept_ra"))
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
