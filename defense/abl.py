"""ABL, Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li, Ma, "Anti-Backdoor Learning: Training Clean Models on
Poisoned Data", NeurIPS 2021, arXiv 2110.11571; spec: docs/specs/abl.md).

A training-time defense: a fresh model is trained on the attacker's poisoned training set. Backdoored samples are
learned much faster than clean ones, so ABL trains with local gradient ascent (LGA: a batch whose loss fell below
gamma is ascended, holding the loss near gamma), isolates the lowest-loss samples, trains on the rest, and unlearns
the backdoor by gradient ascent on the isolated ones. Four engine phases, so --resume continues in the right one:

    isolation (LGA, tuning_epochs) -> select (score, isolate) -> finetune (CE on the rest) -> unlearn (-CE)

    python defense/abl.py --result_file badnet_demo

The isolation is ABL's detection: a sample's score is minus its loss under the isolation model (higher = more
suspicious), the isolated ones are its flags (detection_scores.csv, the det_ keys of summary.json).

Project decisions (spec §7): BackdoorBench's effective values as defaults, with the paper's LGA at batch level (the
updates of BackdoorBench's Flooding default); the attack's architecture, new weights from the defense seed; the
continued-training optimiser reused for unlearning (momentum carried over); scoring in eval mode, fp32 logits, CE in
float64, ties by lower index; a seeded generator per random purpose; a record's clean reserve is not used.
"""
import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.detection import detection_metrics
from utils.engine.augment import cutout, random_crop_flip, to_unit
from utils.engine.device import to_device
from utils.engine.epoch import batch_indices, progress, weighted_sum
from utils.engine.evaluate import eval_mode
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import fused, set_lr
from utils.errors import UserError, run_main
from utils.options import milestones
from utils.registry import register
from utils.retrain import fresh_model
from utils.seeding import generator


positive = in_range(0, lo_open=True)
OPTIONS = [
    # isolation (LGA)
    Opt("gamma", float, 0.5, "LGA threshold: sign(CE - gamma) * CE", check=in_range(0)),
    Opt("lga_reduction", str, "batch", "the sign of the batch-mean CE (both codes) or of each sample's (the paper)",
        choices=("batch", "sample")),
    Opt("tuning_epochs", int, 20, "isolation epochs", check=in_range(1)),
    Opt("lr", float, 0.01, "isolation learning rate (constant)", check=positive),
    Opt("isolation_shuffle", bool, True, "shuffle the isolation batches (false: the authors' fixed order)"),
    Opt("isolation_augment", bool, False, "the attack's crop / flip on isolation batches (neither original)"),
    Opt("isolation_ratio", float, 0.01, "n_iso = int(N * ratio)", check=in_range(0, 1, lo_open=True, hi_open=True)),
    # continued training on the rest
    Opt("finetuning_ascent_model", bool, True, "run the continued-training phase on the non-isolated samples"),
    Opt("finetuning_epochs", int, 60, "continued-training epochs", check=in_range(0)),
    Opt("lr_finetuning", float, 0.01, "its initial learning rate (BackdoorBench's hard-coded value)", check=positive),
    Opt("finetuning_milestones", milestones, [40], "completed epochs after which the lr is multiplied by the gamma"),
    Opt("finetuning_lr_gamma", float, 0.1, "lr factor at each milestone", check=in_range(0, 1, lo_open=True)),
    Opt("finetune_augment", bool, True, "the attack's crop / flip on continued-training batches"),
    Opt("cutout_length", int, 0, "Cutout on continued-training batches (0: off; the authors: 3)", check=in_range(0)),
    # unlearning
    Opt("unlearning_epochs", int, 20, "unlearning epochs (gradient ascent on the isolated samples)", check=in_range(1)),
    Opt("lr_unlearning", float, 1e-4, "unlearning learning rate (constant)", check=positive),
    Opt("unlearning_augment", bool, True, "the attack's crop / flip on unlearning batches (the authors: false)"),
    # shared
    Opt("batch_size", int, 256, "batch size of every phase (shuffled, last batch kept)", check=in_range(1)),
    Opt("momentum", float, 0.9, "SGD momentum of both optimisers", check=in_range(0, 1, hi_open=True)),
    Opt("weight_decay", float, 1e-4, "SGD weight decay", check=in_range(0)),
    Opt("nesterov", bool, True, "Nesterov momentum"),
    Opt("score_dtype", str, "float64", "dtype of the scoring CE (float32: the originals')",
        choices=("float64", "float32")),
    Opt("eval_every", int, 1, "test evaluation every N epochs (the last of each phase always)", check=in_range(1)),
]

# the spec's per-dataset values (§3.2); mnist / fashion_mnist: the project's scaled-down proposal
SMALL = {"tuning_epochs": 2, "lr": 0.05, "finetuning_epochs": 3, "lr_finetuning": 0.05, "finetuning_milestones": [2],
         "unlearning_epochs": 10, "lr_unlearning": 5e-4, "batch_size": 128}
SPEC = {"tiny": {"tuning_epochs": 40, "finetuning_epochs": 120, "unlearning_epochs": 4},
        "mnist": SMALL, "fashion_mnist": SMALL}


# --- 1. the defender's data: the attacker's poisoned training set ------------------------------------------------

@dataclass
class TrainSet:
    """D: training indices (CPU); on the device uint8 images, poisoned-set labels, and for metrics only the true
    labels and the poison indicator. The phases' sets (D, C, I) are positions in it."""
    index: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    y_true: torch.Tensor
    poisoned: torch.Tensor


def poisoned_set(data, device) -> TrainSet:
    """D as the attacker trained on it (a clean reserve is not part of it)."""
    tr = data.train_indices
    return TrainSet(tr.clone(), data.x_train[tr].to(device), data.y_train[tr].to(device),
                    data.y_train_true[tr].to(device), data.poison_indicator[tr].to(device).bool())


# --- 2. objectives on a batch's per-sample CE: (loss, ascended units, units) --------------------------------------

def lga(per, gamma, per_sample=False):
    """sign(l - gamma) * l of the batch-mean CE (both codes; BackdoorBench's Flooding |l - gamma| + gamma makes the
    same updates) or of each sample's CE, averaged (the paper's formula): descent above gamma, ascent below, no
    gradient at gamma."""
    v = per if per_sample else per.mean()
    return (torch.sign(v - gamma) * v).mean(), (v < gamma).sum().double(), v.numel()


descent = lambda per: (per.mean(), None, 0)     # noqa: E731  continued training: CE_B
ascent = lambda per: (-per.mean(), None, 0)     # noqa: E731  unlearning: -CE_B


# --- 3. augmentation, optimisers, one epoch -------------------------------------------------------------------------

def make_augment(record, gen, crop_flip: bool, cutout_length=0):
    """The attack's crop / flip (conventions §4) when on, then Cutout when length > 0, drawn from gen; None: none."""
    if not crop_flip and cutout_length == 0:
        return None
    padding, hflip = int(record.config["crop_padding"]), record.config.get("hflip")
    hflip = record.dataset.info.hflip if hflip is None else bool(hflip)

    def augment(xb):
        if crop_flip:
            xb = random_crop_flip(xb, gen, padding, hflip)
        if cutout_length:
            xb = cutout(xb, cutout_length, gen)
        return xb
    return augment


def make_sgd(params, cfg):
    params = list(params)   # the lr is set per epoch by each phase
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                           nesterov=cfg["nesterov"], **fused(params))


def finetune_lr(epoch, cfg):
    """lr_finetuning * gamma^(milestones m <= epoch - 1), epoch counted from 1."""
    passed = sum(m <= epoch - 1 for m in cfg["finetuning_milestones"])
    return cfg["lr_finetuning"] * cfg["finetuning_lr_gamma"] ** passed


def run_epoch(model, s: TrainSet, batches, augment, opt, precision, objective, desc) -> dict:
    """One pass in train mode over the batches (positions in s): fp32 per-sample CE, objective, one step per batch.
    Returns the mean objective and CE, the LGA ascent fraction and the training split of conventions §9."""
    if not batches:
        raise UserError("a phase of ABL has no sample to train on")
    model.train()
    dev = batches[0].device
    obj, ce, asc = (torch.zeros((), dtype=torch.float64, device=dev) for _ in range(3))
    units, preds = 0, []
    for idx in progress(batches, desc):
        xb = to_unit(s.x[idx])
        with precision.autocast():
            logits = model(precision.prepare_input(augment(xb) if augment else xb))
        per = F.cross_entropy(logits.float(), s.y[idx], reduction="none")
        loss, ascended, unit = objective(per)
        opt.zero_grad(set_to_none=True)
        precision.step(loss, opt)
        obj, ce = weighted_sum(obj, loss, len(idx)), ce + per.detach().double().sum()
        if ascended is not None:
            asc, units = asc + ascended, units + unit
        preds.append(logits.detach().argmax(1))
    order, preds = torch.cat(batches), torch.cat(preds)
    bd, ok, n = s.poisoned[order], preds == s.y[order], len(order)
    rate = lambda hit, among: (hit & among).sum().double() / among.sum()   # noqa: E731  nan where none is among
    acc, clean, asr, ra, frac = torch.stack([rate(ok, bd | ~bd), rate(ok, ~bd), rate(ok, bd),
                                             rate(preds == s.y_true[order], bd), rate(bd, bd | ~bd)]).tolist()
    return {"train_loss": obj.item() / n, "train_ce": ce.item() / n,
            **({"lga_ascent_fraction": asc.item() / units} if units else {}),
            "n_train": n, "train_poisoned_fraction": frac, "train_acc": acc, "train_acc_clean_only": clean,
            "train_asr_bd_only": asr, "train_ra_bd_only": ra}


# --- 4. scoring and isolation ---------------------------------------------------------------------------------------

@torch.no_grad()
def sample_losses(model, x, y, precision, batch_size=1024, dtype=torch.float64):
    """l_i = CE(f(x_i), y_i) against the poisoned-set label for every sample: eval mode, un-augmented, autocast off
    (fp32 logits whatever --amp says), CE in `dtype`; weights and BN statistics untouched."""
    out = []
    with eval_mode(model), torch.autocast(x.device.type, enabled=False):
        for i in range(0, len(y), batch_size):
            logits = model(precision.prepare_input(to_unit(x[i:i + batch_size])))
            out.append(F.cross_entropy(logits.float().to(dtype), y[i:i + batch_size], reduction="none"))
    return torch.cat(out).cpu()


def isolation_count(n: int, ratio: float) -> int:
    """n_iso = int(N * ratio): the originals' float truncation (N = 100, ratio 0.29 gives 28)."""
    k = int(n * ratio)
    if k <= 0 or k >= n:
        raise UserError(f"isolation_ratio {ratio} of N = {n} training samples isolates {k}: "
                        + (f"none; raise it to at least {1 / n:.3g}" if k <= 0 else "all of them, leaving nothing to "
                           "train on; lower it"))
    return k


def isolation_order(losses):
    """Positions by loss ascending, the lower position (= training index) first on ties; and each one's rank."""
    order = torch.sort(losses, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return order, rank


def isolation_report(losses, order, n_iso, poisoned, pratio) -> dict:
    """The det_ figures of s = -loss with the n_iso isolated samples as flags, the ABL counts, and BackdoorBench's
    oracle rule (the int(N * pratio) lowest losses, pratio being the attack's true rate)."""
    flags = torch.zeros(len(losses), dtype=torch.bool)
    flags[order[:n_iso]] = True
    n_p, k = int(poisoned.sum()), int(len(losses) * pratio)
    oracle = poisoned[order[:k]]
    return {**detection_metrics(-losses, poisoned, flags), "n_isolated": n_iso, "isolated_poisoned":
            int(poisoned[flags].sum()), "isolation_loss_threshold": losses[order[n_iso - 1]].item(),
            "oracle_count": k, "precision_at_pratio": oracle.double().mean().item() if k else math.nan,
            "recall_at_pratio": int(oracle.sum()) / n_p if n_p else math.nan}


def write_isolation(run, s: TrainSet, losses, rank, order, n_iso):
    """detection_scores.csv (score,label,flagged, in training-index order: analysis/detection.py reads it) and
    isolated.txt (the isolated training indices, most suspicious first)."""
    run.write_file("detection_scores.csv", "score,label,flagged\n" + "".join(
        f"{v!r},{p},{f}\n" for v, p, f in zip((-losses).tolist(), s.poisoned.long().tolist(),
                                              (rank < n_iso).long().tolist())))
    run.write_file("isolated.txt", "".join(f"{i}\n" for i in s.index[order[:n_iso]].tolist()))


class Selection:
    """I (positions in D), kept in the checkpoint: the phases after `select` read it there, so a resume never
    scores again and never depends on an output file."""
    isolated = None

    def state_dict(self):
        return {"isolated": self.isolated}

    def load_state_dict(self, d):
        self.isolated = d["isolated"]


# --- 5. the phases: isolation -> select -> finetune -> unlearn -----------------------------------------------------

def training_phase(ctx, model, s, name, epochs, part, opt, lr_of, objective, gen, augment, offset, **kw) -> Phase:
    """Epochs of run_epoch over the positions part() (D, C or I) at lr_of(epoch); abl_epoch = offset + epoch counts
    the epochs of all phases."""
    cfg, shuffle = ctx.cfg, kw.pop("shuffle", True)

    def train(epoch):
        pos, lr = part(), lr_of(epoch)
        set_lr(opt, lr)
        batches = [pos[b] for b in batch_indices(len(pos), cfg["batch_size"], gen.gen, shuffle, device=ctx.device)]
        stats = run_epoch(model, s, batches, augment, opt, ctx.precision, objective, f"abl {name} {epoch}")
        if objective is ascent:   # logged as the positive CE on I, which rises as unlearning proceeds
            stats["train_loss"] = stats["train_ce"]
        return {"lr": lr, "abl_epoch": offset + epoch, **stats}
    return Phase(name, epochs, train, lambda: ctx.evaluate(model), label=f"{name} epoch", eval_every=cfg["eval_every"],
                 **kw)


def select_phase(ctx, model, s, n_iso, sel) -> Phase:
    """One step (row epoch 0, no test evaluation): score D with the isolation model, isolate the n_iso lowest
    losses, write the files. Its checkpoint holds the unchanged model and I, so a resumed run never scores again."""
    cfg = ctx.cfg

    def step(_):
        t0 = time.time()
        dtype = getattr(torch, cfg["score_dtype"])
        losses = sample_losses(model, s.x, s.y, ctx.precision, cfg["eval_batch_size"], dtype)
        seconds = round(time.time() - t0, 3)
        order, rank = isolation_order(losses)
        sel.isolated = order[:n_iso].clone()
        write_isolation(ctx.run, s, losses, rank, order, n_iso)
        poisoned, pratio = s.poisoned.cpu(), ctx.record.poison.get("pratio")
        if not poisoned.any():
            print("warning: the training set holds no poisoned sample: the threshold-free detection figures are nan")
        report = isolation_report(losses, order, n_iso, poisoned,
                                  poisoned.double().mean().item() if pratio is None else float(pratio))
        print(f"isolated {n_iso} of {len(s.y)} samples, {report['isolated_poisoned']} poisoned: precision "
              f"{report['det_precision']:.4f}, recall {report['det_recall']:.4f}, AUROC {report['det_auroc']:.4f}")
        return {"lr": None, "abl_epoch": cfg["tuning_epochs"], "n_train": len(s.y), "n_poisoned": int(poisoned.sum()),
                "score_seconds": seconds, **report}
    return Phase("select", 1, step, lambda: {}, label="select, epoch", start=0, eval_every=0)


# --- 6. configuration and the run ---------------------------------------------------------------------------------

@register("abl", "defense", paper="Li et al., NeurIPS 2021", needs=("poisoned_train_set",), options=OPTIONS,
          summary="Anti-Backdoor Learning: train from scratch with LGA, isolate the lowest-loss samples, keep "
                  "training on the rest, unlearn the isolated ones")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("abl", OPTIONS, argv, __doc__, spec_for=lambda cfg, d: SPEC.get(d), dataset=dataset)
    if cfg["nesterov"] and cfg["momentum"] == 0:
        raise UserError("nesterov needs momentum > 0: pass --nesterov false with --momentum 0")
    return cfg, args


def phases(ctx, model, s, n_iso, sel, state) -> list:
    """isolation (LGA on D, opt_iso) -> select -> finetune (CE on C) -> unlearn (-CE on I), both with opt_main."""
    cfg, parts = ctx.cfg, {"D": torch.arange(len(s.y), device=ctx.device)}
    gen = lambda k: state[f"gen_{k}"]                                                      # noqa: E731
    aug = lambda on, cut=0: make_augment(ctx.record, gen("augment").gen, on, cut)         # noqa: E731
    phase = functools.partial(training_phase, ctx, model, s)

    def split():   # C (in index order) and I, from the selection (made by this run or by the one it resumes)
        keep = torch.ones(len(s.y), dtype=torch.bool)
        keep[sel.isolated] = False
        parts.update(C=to_device(keep.nonzero().squeeze(1), ctx.device), I=to_device(sel.isolated, ctx.device))
    t, f = cfg["tuning_epochs"], cfg["finetuning_epochs"] if cfg["finetuning_ascent_model"] else 0
    lga_objective = functools.partial(lga, gamma=cfg["gamma"], per_sample=cfg["lga_reduction"] == "sample")
    return [phase("isolation", t, lambda: parts["D"], state["opt_iso"], lambda e: cfg["lr"], lga_objective,
                  gen("isolation_shuffle"), aug(cfg["isolation_augment"]), offset=0, shuffle=cfg["isolation_shuffle"],
                  show=("train_ce", "lga_ascent_fraction")),
            select_phase(ctx, model, s, n_iso, sel),
            phase("finetune", f, lambda: parts["C"], state["opt_main"], lambda e: finetune_lr(e, cfg), descent,
                  gen("finetune_shuffle"), aug(cfg["finetune_augment"], cfg["cutout_length"]), offset=t, setup=split),
            phase("unlearn", cfg["unlearning_epochs"], lambda: parts["I"], state["opt_main"],
                  lambda e: cfg["lr_unlearning"], ascent, gen("unlearn_shuffle"), aug(cfg["unlearning_augment"]),
                  offset=t + f, setup=split)]


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("abl", cfg, args)
    try:
        s = poisoned_set(ctx.data, ctx.device)
        n_iso = isolation_count(len(s.y), cfg["isolation_ratio"])
        model, sel = fresh_model(ctx), Selection()
        state = {"model": model, "opt_iso": make_sgd(model.parameters(), cfg),
                 "opt_main": make_sgd(model.parameters(), cfg), "precision": ctx.precision, "selection": sel,
                 **{f"gen_{k}": GeneratorState(generator(cfg["random_seed"], f"abl_{k}"))
                    for k in ("isolation_shuffle", "finetune_shuffle", "unlearn_shuffle", "augment")}}
        print(f"ABL: a fresh {ctx.record.config['model']} on N = {len(s.y)} training samples "
              f"({int(s.poisoned.sum())} poisoned), isolating {n_iso}")
        rows = fit(ctx.run, phases(ctx, model, s, n_iso, sel, state), state)
        extra = {k: v for k, v in next(r for r in rows if r["phase"] == "select").items()
                 if k not in ("epoch", "phase", "lr", "seconds", "abl_epoch", "n_train")}
        extra["isolated_label_hist"] = torch.bincount(s.y.cpu()[sel.isolated], minlength=ctx.data.num_classes).tolist()
        for ph in ("isolation", "select", "finetune", "unlearn"):
            done = [r for r in rows if r["phase"] == ph]
            extra[f"{ph}_seconds"] = round(sum(r["seconds"] for r in done), 3)
            if ph in ("isolation", "finetune"):   # the model after isolation and after continued training
                extra.update({f"{ph}_{m}": done[-1][m] if done else None for m in ("test_acc", "test_asr", "test_ra")})
        curve_rows = [{**r, "epoch": r["abl_epoch"]} for r in rows]   # ACC / ASR / RA against the ABL epoch t
        return finish_defense(ctx, curve_rows, ctx.plain_payload(model), extra,
                              curves_title=f"abl on {ctx.record.path.name} (isolation to epoch {cfg['tuning_epochs']})")
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
