"""Reconstructive Neuron Pruning (Li, Lyu, Ma, Koren, Lyu, Li, Jiang, "Reconstructive Neuron Pruning for Backdoor
Defense", ICML 2023, arXiv 2305.14876; spec: docs/specs/rnp.md).

RNP exposes backdoor neurons by unlearning, then recovering. Gradient ascent on the cross-entropy of a few clean
images, over all weights, until the model's accuracy on them collapses (the backdoor survives it); then, with those
weights frozen, one mask per BN channel learned to bring the clean loss back down. Channels the clean task needs
return toward 1, channels only the backdoor uses stay low. The channels with low masks are pruned (BN scale set to
0) in the original attacked model; the unlearned model only ranks them, and nothing is fine-tuned.

    python defense/rnp.py --result_file badnet_demo

Project decisions (spec §7): the fixed threshold 0.7 (BackdoorBench's exported model) or the clean-subset rule of
ANP, never the test sets; at most unlearning_epochs ascent epochs, and the last one is used (flagged) when the
threshold is never reached; gradient clipping off by default (both originals' call clips nothing), applied after
the backward pass when set; no unused noise parameters. Neurons and pruning: defense/anp_pruning.py (ANP's).
"""
import torch
import torch.nn.functional as F

from defense.anp_pruning import (apply_pruning, augment_options, check_pruning, check_subset, masked_copy,
                                 masked_layers, mask_vector, neuron_table, one_axis, prune_phase, pruning_options)
from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.epoch import batch_indices, weighted_sum
from utils.engine.loop import GeneratorState, Phase, fit
from utils.errors import run_main
from utils.io import read_json
from utils.metrics import accuracy
from utils.options import clean_subset_options, milestones
from utils.registry import register
from utils.seeding import generator


positive = in_range(0, lo_open=True)
OPTIONS = [
    *clean_subset_options(ratio=0.01),
    Opt("batch_size", int, 256, "batch of both phases (reshuffled every epoch, last batch kept)", check=in_range(1)),
    # unlearning: SGD ascent over all weights
    Opt("unlearning_lr", float, 0.01, "lr of the ascent", check=positive),
    Opt("unlearning_momentum", float, 0.9, "SGD momentum of the ascent", check=in_range(0, 1)),
    Opt("unlearning_wd", float, 5e-4, "weight decay of the ascent (it still shrinks the weights)", check=in_range(0)),
    Opt("schedule", milestones, [10, 20], "MultiStepLR milestones of the ascent, in epochs"),
    Opt("schedule_gamma", float, 0.1, "factor of each milestone", check=in_range(0, 1, lo_open=True)),
    Opt("unlearning_epochs", int, 20, "most epochs of ascent", check=in_range(1)),
    Opt("clean_threshold", float, 0.2, "stop the ascent once the epoch's clean-subset accuracy is <= this",
        check=in_range(0, 1)),
    Opt("clip_grad_norm", float, None, "total-norm clip of the ascent gradient (none: no clipping, as the originals' "
        "misplaced call)", check=positive),
    # recovering: masks on the frozen unlearned model
    Opt("recovering_lr", float, 0.2, "lr of the masks, constant", check=positive),
    Opt("recovering_momentum", float, 0.9, "SGD momentum of the masks (no weight decay)", check=in_range(0, 1)),
    Opt("recovering_epochs", int, 20, "epochs of mask learning", check=in_range(1)),
    Opt("alpha", float, 0.2, "factor of the recovering loss (a lr scale)", check=positive),
    *pruning_options(0.7),
    *augment_options(),
    Opt("save_unlearned", bool, False, "also write the unlearned model as unlearned_model.pt"),
]


# --- 1. the two steps: gradient ascent on all weights, then descent on the masks --------------------------------

def ascent_step(model, xb, yb, opt, precision, clip=None):
    """One SGD step on -CE over all parameters (weight decay applied as usual); the total gradient norm is
    measured before clipping, which acts after the backward pass. Returns (CE, logits, norm)."""
    with precision.autocast():
        logits = model(precision.prepare_input(xb))
    loss = F.cross_entropy(logits.float(), yb)
    opt.zero_grad(set_to_none=True)
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    scaler = precision.scaler
    (scaler.scale(-loss) if scaler is not None else -loss).backward()
    if scaler is not None:
        scaler.unscale_(opt)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return loss.detach(), logits.detach(), norm.detach()


def recover_step(model, layers, xb, yb, opt, alpha, precision):
    """One SGD step of the masks on alpha * CE (train mode), then the masks clamped to [0, 1]."""
    with precision.autocast():
        logits = model(precision.prepare_input(xb))
    loss = alpha * F.cross_entropy(logits.float(), yb)
    masks = [layer.mask for layer in layers]
    for m, g in zip(masks, torch.autograd.grad(loss, masks)):
        m.grad = g
    opt.step()
    with torch.no_grad():
        for m in masks:
            m.clamp_(0, 1)
    return loss.detach(), logits.detach()


def stop_rule(threshold):
    """The ascent stops after the first epoch whose clean-subset accuracy (training predictions) is <= threshold."""
    return lambda row: row["train_acc"] <= threshold


# --- 2. the phases: unlearn (early stop), recover, prune -----------------------------------------------------

def epoch_over(ctx, x, y, state, step):
    """One pass over the subset in a fresh order, augmented; step(xb, yb) -> (loss, logits, extra or None).
    Returns the mean loss, the accuracy of the batch predictions and the mean of the extras (one read-back)."""
    cfg = ctx.cfg
    hflip = ctx.record.dataset.info.hflip if cfg["hflip"] is None else cfg["hflip"]
    batches = batch_indices(len(y), cfg["batch_size"], state["shuffle_gen"].gen, device=x.device)
    loss_sum, extra_sum, preds = torch.zeros((), dtype=torch.float64, device=x.device), 0.0, []
    for idx in batches:
        xb = random_crop_flip(to_unit(x[idx]), state["aug_gen"].gen, cfg["crop_padding"], hflip)
        loss, logits, extra = step(xb, y[idx])
        loss_sum = weighted_sum(loss_sum, loss, len(idx))
        extra_sum = extra_sum + (extra.double() if extra is not None else 0.0)
        preds.append(logits.argmax(1))
    order = torch.cat(batches)
    return loss_sum.item() / len(y), accuracy(torch.cat(preds), y[order]), float(extra_sum) / len(batches)


def unlearn_phase(ctx, u, x, y, state) -> Phase:
    cfg, opt, sched = ctx.cfg, state["unlearn_opt"], state["unlearn_sched"]

    def train_epoch(epoch):
        u.train()
        lr = opt.param_groups[0]["lr"]
        loss, acc, norm = epoch_over(ctx, x, y, state, lambda xb, yb: ascent_step(
            u, xb, yb, opt, ctx.precision, cfg["clip_grad_norm"]))
        sched.step()
        return {"lr": lr, "train_loss": loss, "train_acc": acc, "grad_norm_mean": norm}
    return Phase("unlearn", cfg["unlearning_epochs"], train_epoch, lambda: ctx.evaluate(u), label="unlearn epoch",
                 stop=stop_rule(cfg["clean_threshold"]))


def recover_phase(ctx, u, r, x, y, state) -> Phase:
    cfg, opt, layers = ctx.cfg, state["mask_opt"], masked_layers(r)
    tau = torch.tensor(cfg["pruning_number"], dtype=torch.float32)

    def train_epoch(epoch):
        if epoch == 1:   # R starts as the unlearned model (weights and BN buffers), masks at 1
            r.load_state_dict(u.state_dict(), strict=False)
            with torch.no_grad():
                for layer in layers:
                    layer.mask.fill_(1)
            if cfg["save_unlearned"]:
                ctx.run.save_model(ctx.plain_payload(u), name="unlearned_model.pt")
        r.train()
        loss, acc, _ = epoch_over(ctx, x, y, state, lambda xb, yb: (*recover_step(
            r, layers, xb, yb, opt, cfg["alpha"], ctx.precision), None))
        m = mask_vector(layers)
        return {"lr": opt.param_groups[0]["lr"], "train_loss": loss, "train_acc": acc, "mask_mean": m.mean().item(),
                "mask_min": m.min().item(),
                "n_mask_le_tau": int((m <= tau).sum()) if cfg["pruning_by"] == "threshold" else None}
    return Phase("recover", cfg["recovering_epochs"], train_epoch, lambda: ctx.evaluate(r), label="recover epoch",
                 show=("train_acc", "mask_mean"))


def unlearn_summary(rows, threshold) -> dict:
    u = [row for row in rows if row.get("phase") == "unlearn"]
    rec = [row for row in rows if row.get("phase") == "recover"]
    seconds = lambda ph: round(sum(row["seconds"] for row in rows if row.get("phase") == ph), 3)   # noqa: E731
    return {"unlearn_epochs_run": len(u), "unlearn_reached_threshold": u[-1]["train_acc"] <= threshold,
            "unlearn_final_train_acc": u[-1]["train_acc"], "unlearned_test_acc": u[-1].get("test_acc"),
            "unlearned_test_asr": u[-1].get("test_asr"), "recover_final_train_acc": rec[-1]["train_acc"],
            "unlearn_seconds": seconds("unlearn"), "recover_seconds": seconds("recover")}


@register("rnp", "defense", paper="Li et al., ICML 2023", needs=("trained_model", "clean_subset"), options=OPTIONS,
          summary="Reconstructive Neuron Pruning: unlearn clean data by gradient ascent, recover it with BN-channel "
                  "masks, prune the lowest in the attacked model")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("rnp", OPTIONS, argv, __doc__, dataset=dataset)
    check_pruning(cfg, float("inf"))
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("rnp", cfg, args)
    try:
        x, y, _ = ctx.clean_subset(cfg["ratio"], False, cfg["index"])
        check_subset(ctx, y)
        model = ctx.attacked_model()          # M: pruned at the end, never trained
        check_pruning(cfg, len(neuron_table(model)))
        u = ctx.attacked_model()              # U: unlearned
        r = ctx.precision.prepare_model(masked_copy(ctx.record.model, noise=False))   # R: loaded from U* later
        opt = torch.optim.SGD(u.parameters(), lr=cfg["unlearning_lr"], momentum=cfg["unlearning_momentum"],
                              weight_decay=cfg["unlearning_wd"])
        layers = masked_layers(r)
        state = {"unlearn_model": u, "unlearn_opt": opt, "recover_model": r, "precision": ctx.precision,
                 "unlearn_sched": torch.optim.lr_scheduler.MultiStepLR(opt, cfg["schedule"], cfg["schedule_gamma"]),
                 "mask_opt": torch.optim.SGD([layer.mask for layer in layers], lr=cfg["recovering_lr"],
                                             momentum=cfg["recovering_momentum"]),
                 "shuffle_gen": GeneratorState(generator(cfg["random_seed"], "shuffle")),
                 "aug_gen": GeneratorState(generator(cfg["random_seed"], "augmentation"))}
        rows = fit(ctx.run, [unlearn_phase(ctx, u, x, y, state), recover_phase(ctx, u, r, x, y, state),
                             prune_phase(ctx, model, lambda: mask_vector(layers), x, y)], state)
        extra = unlearn_summary(rows, cfg["clean_threshold"])
        if not extra["unlearn_reached_threshold"]:
            print(f"warning: the ascent never brought the clean-subset accuracy to {cfg['clean_threshold']} in "
                  f"{cfg['unlearning_epochs']} epochs; the masks were learned on the last unlearned model")
        p = read_json(ctx.run.path / "pruned.json", "record file")
        apply_pruning(model, neuron_table(model), p["neurons"])   # also when a resume found the phase done
        return finish_defense(ctx, one_axis(rows), ctx.plain_payload(model), {
            **{k: v for k, v in p.items() if k not in ("neurons", "pruned")}, **extra})
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
