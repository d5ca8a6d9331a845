"""SAU, Shared Adversarial Unlearning (Wei, Zhang, Zha, Wu, NeurIPS 2023, arXiv 2307.10562).

A post-training purification. The backdoored model is copied twice: f_theta, which is fine-tuned, and a
frozen reference f_r. For every batch of a small clean subset, a per-sample PGD perturbation is searched that
fools *both* models into the *same* wrong label (a shared adversarial example, SAE); f_theta then keeps its clean
accuracy while unlearning the label the backdoored reference gives those SAEs, with the loss -log(1 - p).
Everything is in [0, 1] pixel space; the perturbation is not clamped to valid images (as the original).
Spec: docs/specs/sau.md.

    python defense/sau.py --result_file badnet_demo
"""


import torch
import torch.nn.functional as F

from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.errors import run_main
from utils.seeding import generator
from utils.engine.augment import to_unit
from utils.engine.epoch import batch_indices, progress, weighted_sum
from utils.engine.evaluate import predict
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import fused
from utils.engine.timing import Stopwatch
from utils.options import clean_subset_options
from utils.registry import register

OPTIONS = [
    *clean_subset_options(ratio=0.05),   # floor(N * ratio), drawn uniformly
    Opt("batch_size", int, 256, "batch size over the clean subset (shuffled, last batch kept)", check=in_range(1)),
    Opt("n_rounds", int, 100, "outer epochs over the clean subset", check=in_range(1)),
    Opt("outer_steps", int, 1, "parameter updates per batch of shared adversarial examples", check=in_range(1)),
    Opt("client_optimizer", str, "adam", "optimiser of f_theta: Adam with amsgrad, betas (0.9, 0.999), no weight decay",
        choices=("adam",)),
    Opt("lr", float, 1e-4, "learning rate, constant (the original's scheduler is never stepped)",
        check=in_range(0, lo_open=True)),
    Opt("norm_type", str, "L_inf", "norm of the PGD ball", choices=("L_inf",)),
    Opt("trigger_norm", float, 0.2, "PGD bound epsilon, in pixel units", check=in_range(0, lo_open=True)),
    Opt("adv_lr", float, 0.2, "PGD step size alpha, in pixel units", check=in_range(0, lo_open=True)),
    Opt("adv_steps", int, 5, "PGD iterations (stopping early once every sample is shared)", check=in_range(1)),
    Opt("pgd_init", str, "max", "PGD start: +epsilon everywhere", choices=("max",)),
    Opt("beta_1", float, 0.01, "weight of the adversarial term of PGD (paper lambda_3)", check=in_range(0)),
    Opt("beta_2", float, 1.0, "weight of the shared (Jensen-Shannon) term of PGD (paper lambda_4)", check=in_range(0)),
    Opt("lmd_1", float, 1.0, "weight of the clean cross-entropy (paper lambda_1)", check=in_range(0)),
    Opt("lmd_2", float, 0.0, "weight of plain adversarial-training cross-entropy (off)", check=in_range(0)),
    Opt("lmd_3", float, 1.0, "weight of the shared-adversarial unlearning loss (paper lambda_2)", check=in_range(0)),
    Opt("train_mode", bool, False, "f_theta in train mode for the unlearning forward (BN statistics updated); "
        "default eval mode throughout, as the original"),
]

# --- the inner maximisation: shared PGD (spec §5.1) -----------------------------------------------------------

def adversarial_term(logits, logits_r, y, fooled, fooled_r):
    """L_adv = -(1/(2B)) [sum over samples f_theta does not yet misclassify of CE(f_theta(x~), y)
                          + the same for f_r]. Uses the true labels."""
    ce = F.cross_entropy(logits.float(), y, reduction="none")
    ce_r = F.cross_entropy(logits_r.float(), y, reduction="none")
    return -(torch.where(fooled, 0.0, ce).sum() + torch.where(fooled_r, 0.0, ce_r).sum()) / (2 * len(y))


def js_term(logits, logits_r, shared):
    """L_sh = (1/B) sum over samples not yet shared of the Jensen-Shannon divergence of p and q (natural log),
    with p and q clamped to >= 1e-8 and m = (p + q) / 2."""
    p = logits.float().softmax(1).clamp(min=1e-8)
    q = logits_r.float().softmax(1).clamp(min=1e-8)
    m = (p + q) / 2
    js = 0.5 * (p * (p / m).log() + q * (q / m).log()).sum(1)
    return torch.where(shared, 0.0, js).sum() / len(shared)


def shared_mask(pred, pred_r, pred0, pred0_r):
    """Both models moved away from their clean prediction, to the same label."""
    return (pred != pred0) & (pred_r != pred0_r) & (pred == pred_r)


def shared_pgd(model, ref, x, y, cfg, precision):
    """Per-sample L_inf PGD towards shared adversarial examples. Descends on beta_1 L_adv + beta_2 L_sh with
    sign steps, starting at +epsilon; stops after the update in which every sample was already shared.
    Returns (delta, number of updates applied)."""
    eps, alpha = cfg["trigger_norm"], cfg["adv_lr"]
    delta = torch.full_like(x, eps).clamp_(-eps, eps)  # pgd_init "max"
    steps = 0
    pred0 = pred0_r = None
    for _ in range(cfg["adv_steps"]):
        # clean predictions: fixed while the model is in eval mode (always, in SAU); recomputed otherwise
        if pred0 is None or model.training:
            with torch.no_grad(), precision.autocast():
                pred0, pred0_r = model(x).argmax(1), ref(x).argmax(1)
        delta.requires_grad_(True)
        xt = precision.prepare_input(x + delta)  # not clamped to [0, 1] (project decision 6)
        with precision.autocast():
            logits, logits_r = model(xt).float(), ref(xt).float()
        pred, pred_r = logits.argmax(1), logits_r.argmax(1)
        shared = shared_mask(pred, pred_r, pred0, pred0_r)
        loss = (cfg["beta_1"] * adversarial_term(logits, logits_r, y, pred != pred0, pred_r != pred0_r)
                + cfg["beta_2"] * js_term(logits, logits_r, shared))
        grad, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - alpha * grad.sign()).clamp_(-eps, eps)
        steps += 1
        if bool(shared.all()):
            break
    return delta.detach(), steps


# --- the outer minimisation: unlearning the shared adversarial examples (spec §5.2) -------------------------

def potential_poison_mask(y, pred0_r, pred_r):
    """P: the reference is fooled away from both the true label and its own clean prediction. f_theta's state
    does not enter."""
    return (pred_r != y) & (pred_r != pred0_r)


def sar_loss(logits_adv, pred_r, mask):
    """L_sar = (1/B) sum_{i in P} 1/2 [-log(1e-6 + min(o_i, 0.999)) - log(1 + 1e-6 - max(a_i, 0.001))],
    a_i = p~_i[pred_r_i], o_i = the other classes' probabilities summed: two clipped forms of -log(1 - a_i).
    Samples outside P count in B."""
    p = logits_adv.float().softmax(1)
    a = p.gather(1, pred_r[:, None]).squeeze(1)
    o = p.masked_fill(F.one_hot(pred_r, p.shape[1]).bool(), 0).sum(1)  # 1 - a, summed from the other classes
    term = 0.5 * (-torch.log(1e-6 + o.clamp(max=0.999)) - torch.log(1 + 1e-6 - a.clamp(min=0.001)))
    return torch.where(mask, term, 0.0).sum() / len(mask)


def unlearning_step(model, ref, x, y, delta, cfg, precision, optimizer):
    """One parameter update: clean CE plus the unlearning of the reference's label on x + delta."""
    b = len(y)
    xt = x + delta
    both = precision.prepare_input(torch.cat([x, xt]))
    model.train(cfg["train_mode"])  # as the original: only this forward may run in train mode; PGD runs in eval mode
    with precision.autocast():
        z_all = model(both).float()
    model.eval()
    with torch.no_grad(), precision.autocast():
        zr_all = ref(both).float()
    z, zt = z_all[:b], z_all[b:]
    pred0, pred = z.argmax(1), zt.argmax(1)
    pred0_r, pred_r = zr_all[:b].argmax(1), zr_all[b:].argmax(1)
    mask = potential_poison_mask(y, pred0_r, pred_r)
    loss_clean = F.cross_entropy(z, y)
    loss_sar = sar_loss(zt, pred_r, mask)
    loss = cfg["lmd_1"] * loss_clean + cfg["lmd_3"] * loss_sar
    if cfg["lmd_2"] > 0:  # plain adversarial training, off by default
        loss = loss + cfg["lmd_2"] * F.cross_entropy(zt, y)
    optimizer.zero_grad(set_to_none=True)
    precision.step(loss, optimizer)
    return {"train_loss": loss, "train_loss_clean": loss_clean, "train_loss_sar": loss_sar,
            "mask_fraction": mask.float().mean(),
            # the SAEs actually found, judged on the returned delta at no extra cost
            "shared_fraction": shared_mask(pred, pred_r, pred0, pred0_r).float().mean()}


def sau_round(model, ref, x_clean, y_clean, optimizer, cfg, precision, gen):
    """One pass over the clean subset (uint8 on the device), no augmentation: shared PGD, then `outer_steps`
    unlearning updates per batch. Returns the round's mean statistics, PGD time included."""
    model.eval()
    dev = x_clean.device
    totals, weight, pgd_steps, n_batches, pgd_time = {}, 0, 0, 0, Stopwatch(dev)
    for idx in progress(batch_indices(len(y_clean), cfg["batch_size"], gen, shuffle=True, drop_last=False,
                                      device=dev), "sau"):
        x, y = precision.prepare_input(to_unit(x_clean[idx])), y_clean[idx]
        pgd_time.start()
        delta, steps = shared_pgd(model, ref, x, y, cfg, precision)   # its early stop reads the device per step
        pgd_time.stop()
        pgd_steps += steps
        n_batches += 1
        for _ in range(cfg["outer_steps"]):
            stats = unlearning_step(model, ref, x, y, delta, cfg, precision, optimizer)
            for k, v in stats.items():   # float64 sums on the device, read back once
                totals[k] = weighted_sum(totals.get(k, torch.zeros((), dtype=torch.float64, device=dev)), v, len(y))
            weight += len(y)
    out = dict(zip(totals, (v / weight for v in torch.stack(list(totals.values())).tolist())))
    return {"lr": optimizer.param_groups[0]["lr"], **out, "pgd_steps_mean": pgd_steps / n_batches,
            "pgd_seconds": round(pgd_time.total(), 3)}


# --- main -----------------------------------------------------------------------------------------------------

@register("sau", "defense", paper="Wei et al., NeurIPS 2023", needs=("trained_model", "clean_subset"), options=OPTIONS,
          summary="Shared Adversarial Unlearning: unlearn adversarial examples the model shares with its backdoored copy")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    # the options' defaults are the spec's (sau.md §3); tiny has 20 rounds
    return defense_config("sau", OPTIONS, argv, __doc__, dataset=dataset,
                          spec_for=lambda cfg, dataset: {"n_rounds": 20} if dataset == "tiny" else {})


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("sau", cfg, args)
    try:
        x_clean, y_clean, _ = ctx.clean_subset(cfg["ratio"], balanced=False, index_file=cfg["index"])
        model = ctx.attacked_model()
        ref = ctx.attacked_model().eval().requires_grad_(False)  # the frozen backdoored reference
        params = list(model.parameters())
        optimizer = torch.optim.Adam(params, lr=cfg["lr"], betas=(0.9, 0.999), weight_decay=0, amsgrad=True,
                                     **fused(params))
        gen = generator(cfg["random_seed"], "sau_loader")
        sets, precision = ctx.eval_sets, ctx.precision

        def evaluate():
            m = ctx.evaluate(model)
            # CE of the poisoned test set against the true labels (BackdoorBench's ra_test_loss)
            _, m["ra_test_loss"] = predict(model, sets.x_bd, precision, cfg["eval_batch_size"], sets.y_bd_true)
            return m

        rounds = Phase("unlearn", cfg["n_rounds"],
                       lambda r: sau_round(model, ref, x_clean, y_clean, optimizer, cfg, precision, gen),
                       evaluate, label="round", show=("shared_fraction",))
        rows = fit(ctx.run, rounds, {"model": model, "optimizer": optimizer, "loader_gen": GeneratorState(gen),
                                     "precision": precision})
        round_seconds = sum(r["seconds"] for r in rows)
        pgd_seconds = sum(r["pgd_seconds"] for r in rows)
        return finish_defense(ctx, rows, ctx.plain_payload(model.eval()), {
            "n_rounds": cfg["n_rounds"], "clean_subset_size": len(y_clean),
            "shared_fraction_first": rows[0]["shared_fraction"], "shared_fraction_last": rows[-1]["shared_fraction"],
            "round_seconds": round(round_seconds, 2), "pgd_seconds": round(pgd_seconds, 2),
            "pgd_share": round(pgd_seconds / round_seconds, 4) if round_seconds else None})
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
