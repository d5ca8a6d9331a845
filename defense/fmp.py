"""FMP, Adversarial Feature Map Pruning (Huang and Bu, "Adversarial Feature Map Pruning for Backdoor",
ICLR 2024, arXiv 2307.11565; spec: docs/specs/fmp.md).

Backdoor triggers are carried by a few feature maps. FMP tests every convolutional feature map on its own:
from a shared random start near a small clean batch it takes one FGSM step that moves that single map as far
as possible, and scores the map by the model's accuracy on the result. In each convolutional layer the
lowest-scoring maps (those whose perturbation hurts accuracy most) are pruned, their filters zeroed, then the
whole model is fine-tuned briefly on the defender's clean data.

    python defense/fmp.py --result_file badnet_demo

Project decisions (conventions decision 4): pruning by module identity (the module whose map was scored),
BatchNorm found by tensor identity, stable tie rule (lower channel index first), ranking on un-augmented
images, evaluation in eval mode. All pixel arithmetic is in [0, 1] pixel space; the models normalise inside.
The per-map gradients come from one traced forward pass (one backward per map from the retained graph, or
several maps per backward with `grad_mode: batched`), not from a re-run of the network per map. Ranking (gradients
and the scoring of the crafted images) is in fp32 whatever --amp says (spec §5, defect 13). On a 2-core CPU the
per-map loop measured faster than the batched products (vmap); on a GPU the loop pays one kernel launch series per
map (4,800 backward passes on PreAct-ResNet-18), so `grad_mode: auto` takes the batched form there.
"""
import json
import math
import time


import torch
from torch import nn

from utils.config import Opt, in_range
from utils.data import dataset_info
from utils.defense import defense_config, finish_defense, open_defense
from utils.errors import UserError, run_main
from utils.io import read_json
from utils.seeding import generator
from defense.fmp_ranking import conv_layers, random_start, rank_feature_maps, ranked_outputs
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.epoch import train_epoch_supervised
from utils.engine.evaluate import eval_mode
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import fused
from utils.options import clean_subset_options
from utils.registry import register

ORIGINAL_PRUNE_RATIO = 1 / 64  # the original keeps `len // 2**6` maps per layer

OPTIONS = [
    *clean_subset_options(ratio=0.1),   # class-balanced: floor(N * ratio / K) per class
    Opt("rank_batch_size", int, 32, "clean images (un-augmented) used to rank the feature maps", check=in_range(1)),
    # both > 0: at 0 every crafted image equals the start, every score ties and the tie rule alone would prune
    Opt("alpha", float, 0.02, "random +-alpha start shared by all maps, pixel units", check=in_range(0, lo_open=True)),
    Opt("eps", float, 0.06, "FGSM step size, pixel units (one step, no projection)", check=in_range(0, lo_open=True)),
    Opt("prune_ratio", float, ORIGINAL_PRUNE_RATIO, "maps pruned per layer: floor(C * prune_ratio)",
        check=in_range(0, 1, hi_open=True)),
    Opt("min_prune_per_layer", int, 0, "lower bound on the maps pruned per layer (0: the original rule)",
        check=in_range(0)),
    Opt("bn_gamma", str, "identity", "identity: also zero gamma of the BatchNorm fed directly by a pruned conv; "
        "off: conv weights only", choices=("identity", "off")),
    Opt("hard_prune", bool, False, "keep the pruned weights (and gammas) at zero throughout fine-tuning"),
    Opt("rank_conv2_as_block_output", bool, False, "PreAct blocks: rank each conv2 by the block's output (conv2 + "
        "shortcut) and zero the gammas that follow it, as the original's in-place residual add effectively does"),
    Opt("grad_mode", str, "auto", "per-map gradients from the shared graph: one backward per map (loop; the faster "
        "on CPU) or batched vector-Jacobian products, map_chunk maps per backward (batched); auto: batched on a GPU, "
        "loop on a CPU", choices=("auto", "loop", "batched")),
    Opt("map_chunk", int, 16, "maps per batched gradient and per stacked scoring forward", check=in_range(1)),
    Opt("epochs", int, 10, "fine-tuning epochs (0: prune only)", check=in_range(0)),
    Opt("batch_size", int, 256, "fine-tuning batch size (shuffle, no drop_last)", check=in_range(1)),
    Opt("lr", float, 0.01, "fine-tuning learning rate", check=in_range(0, lo_open=True)),
    Opt("momentum", float, 0.9, "SGD momentum", check=in_range(0, 1)),
    Opt("weight_decay", float, 0.0, "SGD weight decay", check=in_range(0)),
    Opt("lr_scheduler", str, "CosineAnnealingLR", "CosineAnnealingLR (T_max = epochs, stepped per epoch) or none",
        choices=("CosineAnnealingLR", "none")),
    Opt("eta_min", float, 1e-4, "final learning rate of the cosine schedule", check=in_range(0)),
    Opt("crop_padding", int, 4, "random-crop padding of the fine-tuning augmentation (0: no crop)", check=in_range(0)),
    Opt("hflip", bool, None, "random horizontal flip in fine-tuning (default: the dataset's rule, cifar10 only)"),
]


# --- 3. selection ----------------------------------------------------------------------------------------

def maps_to_prune(channels, prune_ratio, min_prune):
    """n_l = max(min_prune, floor(C * prune_ratio)); a small tolerance keeps C * ratio = 3 from becoming 2.999."""
    return max(min_prune, math.floor(channels * prune_ratio + 1e-9))


def select_maps(scores, n):
    """The n lowest-scoring channels: sort by (score ascending, channel ascending), a stable rule for ties."""
    order = torch.sort(scores, stable=True).indices
    return sorted(order[:n].tolist())


# --- 4. pruning --------------------------------------------------------------------------------------------

@torch.no_grad()
def bn_after_conv(model, x, as_block_output=False):
    """{conv name: [BatchNorm2d names]} for the BNs whose input, in a traced forward pass, is exactly the tensor
    ranked for that conv (pre-activation: conv1 -> bn2 of its block, the stem -> the first block's bn1; a conv whose
    output is summed first has none; post-activation ResNet: every conv -> its own BN). With as_block_output a
    block's conv2 stands for the block's output, which the next block's bn1 normalises: the original's wider set
    (spec §5, defect 12)."""
    bns = {m: n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, inp: seen.__setitem__(bns[mod], inp[0])) for m in bns]
    try:
        with eval_mode(model):
            ranked, _ = ranked_outputs(model, x, as_block_output)
    finally:
        for h in handles:
            h.remove()
    mapping = {}
    for name, _, out in ranked:
        for bn, t in seen.items():
            if t is out:
                mapping.setdefault(name, []).append(bn)
    return mapping


@torch.no_grad()
def prune(model, selection, bn_map=None):
    """Zero W[c, :, :, :] of exactly the scored module for each selected (conv name, channel), and gamma_c of each
    BN that bn_map names for that conv. Biases and BN betas are left alone. Returns the BN entries zeroed."""
    modules = dict(model.named_modules())
    zeroed = []
    for name, c in selection:
        modules[name].weight[c].zero_()
        for bn in (bn_map or {}).get(name, []):
            modules[bn].weight[c] = 0
            zeroed.append((bn, c))
    return zeroed


# --- 5. the defense ------------------------------------------------------------------------------------------

def ranking_batch(x_sub, y_sub, size, seed):
    """The first `size` images of a seeded permutation of the clean subset, in pixel space, un-augmented
    (decision 4). Returns (x, y, positions in the subset)."""
    if size > len(y_sub):
        raise UserError(f"rank_batch_size {size} is larger than the clean subset ({len(y_sub)}); lower it or raise ratio")
    pick = torch.randperm(len(y_sub), generator=generator(seed, "fmp_rank_batch"))[:size]
    dev = pick.to(x_sub.device)
    return to_unit(x_sub[dev]), y_sub[dev], pick


def rank_and_prune(ctx, model, x_sub, y_sub, sub_idx):
    cfg, run = ctx.cfg, ctx.run
    device = ctx.device
    x, y, pick = ranking_batch(x_sub, y_sub, cfg["rank_batch_size"], cfg["random_seed"])
    x = ctx.precision.prepare_input(x)
    x0 = random_start(x, cfg["alpha"], generator(cfg["random_seed"], "fmp_random_start"))

    layers, uncalled = conv_layers(model, x[:1])
    if uncalled:
        print(f"Conv2d modules never called in a forward pass (ignored): {', '.join(uncalled)}")
    if not layers:
        raise UserError("the model has no Conv2d reached in a forward pass; FMP prunes convolutional feature maps")
    total = sum(c for _, _, c in layers)
    grad_mode = cfg["grad_mode"] if cfg["grad_mode"] != "auto" else ("batched" if x.is_cuda else "loop")
    print(f"ranking {total} feature maps of {len(layers)} Conv2d layers on {len(y)} clean images "
          f"(alpha {cfg['alpha']}, eps {cfg['eps']}, {grad_mode} gradients, {cfg['map_chunk']} maps per chunk)")
    t0 = time.time()
    ranked = rank_feature_maps(model, x, y, x0, cfg["eps"], grad_mode, cfg["map_chunk"],
                               cfg["rank_conv2_as_block_output"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    rank_seconds = time.time() - t0
    print(f"ranking time: {rank_seconds:.2f}s")

    rows, selection, per_layer, not_pruned = [], [], {}, []
    for pos, (name, module, scores) in enumerate(ranked):
        c = len(scores)
        n = maps_to_prune(c, cfg["prune_ratio"], cfg["min_prune_per_layer"])
        if n >= c:
            raise UserError(f"{name} has {c} feature maps and {n} would be pruned (prune_ratio {cfg['prune_ratio']}, "
                            f"min_prune_per_layer {cfg['min_prune_per_layer']}); lower them")
        chosen = select_maps(scores, n)
        per_layer[name] = n
        if n == 0:
            not_pruned.append(name)
        selection += [(name, ch) for ch in chosen]
        chosen_set = set(chosen)
        rows += [f"{name},{pos},{ch},{scores[ch].item():.6f},{int(ch in chosen_set)}\n" for ch in range(c)]
        shown = ", ".join(f"{ch} ({scores[ch].item():.3f})" for ch in chosen) or "none"
        print(f"  [{pos:2d}] {name:<28} C={c:<4d} scores {scores.min().item():.3f}..{scores.max().item():.3f} "
              f"mean {scores.mean().item():.3f}; prune {n}: {shown}")
    if not_pruned:
        print(f"layers where floor(C * {cfg['prune_ratio']:g}) = 0 and min_prune_per_layer = "
              f"{cfg['min_prune_per_layer']}, so nothing is pruned there: {', '.join(not_pruned)}")

    bn_map = bn_after_conv(model, x[:1], cfg["rank_conv2_as_block_output"]) if cfg["bn_gamma"] == "identity" else {}
    bn_zeroed = prune(model, selection, bn_map)
    print(f"pruned {len(selection)} of {total} feature maps; BatchNorm gammas zeroed: {len(bn_zeroed)}")

    run.write_file("ranking.csv", "module,position,channel,score,pruned\n" + "".join(rows))
    plan = {"selected": [{"module": n, "channel": c} for n, c in selection],
            "bn_zeroed": [{"bn": b, "channel": c} for b, c in bn_zeroed],
            "pruned_per_layer": per_layer, "layers_not_pruned": not_pruned, "n_pruned": len(selection),
            "n_maps": total, "grad_mode": grad_mode, "uncalled_convs": uncalled, "ranking_seconds": round(rank_seconds, 3),
            "rank_batch_indices": sub_idx[pick].tolist()}  # training indices, as index.txt
    run.write_file("pruned.json", json.dumps(plan, indent=1) + "\n")
    return plan


def zero_mask(model, plan):
    """For hard_prune: re-zero the selected weights and gammas after every optimiser step."""
    selection = [(s["module"], s["channel"]) for s in plan["selected"]]
    bn = [(s["bn"], s["channel"]) for s in plan["bn_zeroed"]]
    modules = dict(model.named_modules())

    @torch.no_grad()
    def apply():
        for name, c in selection:
            modules[name].weight[c].zero_()
        for name, c in bn:
            modules[name].weight[c] = 0
    return apply


def prune_phase(ctx, model, x_sub, y_sub, sub_idx, state) -> Phase:
    """Phase 1, one step numbered 0: rank, prune, write ranking.csv and pruned.json; its checkpoint holds the pruned
    model, so a resumed run never ranks again."""
    def step(_):
        plan = rank_and_prune(ctx, model, x_sub, y_sub, sub_idx)
        ctx.run.update_meta(rank_batch_indices=plan["rank_batch_indices"])
        return {"lr": None, "train_loss": None, "train_acc": None}
    return Phase("prune", 1, step, lambda: ctx.evaluate(model), label="after pruning, epoch", start=0)


def finetune_phase(ctx, model, x_sub, y_sub, state) -> Phase:
    """Phase 2: fine-tune the pruned model on the clean subset (with hard_prune, pruned weights kept at zero)."""
    cfg, opt, sched = ctx.cfg, state["optimizer"], state["scheduler"]
    hflip = dataset_info(ctx.record.config["dataset"]).hflip if cfg["hflip"] is None else cfg["hflip"]
    augment = lambda xb: random_crop_flip(xb, state["aug_gen"].gen, cfg["crop_padding"], hflip)
    after_step = []

    def setup():   # the plan is on disk whether this run pruned or a resumed one did
        if cfg["hard_prune"]:
            after_step.append(zero_mask(model, read_json(ctx.run.path / "pruned.json", "record file")))

    def train_epoch(epoch):
        t = time.time()
        lr = opt.param_groups[0]["lr"]
        stats, _, _ = train_epoch_supervised(model, x_sub, y_sub, opt, ctx.precision, state["shuffle_gen"].gen,
                                             cfg["batch_size"], False, augment, desc=f"fmp fine-tune {epoch}",
                                             after_step=after_step[0] if after_step else None)
        if sched is not None:
            sched.step()
        return {"lr": lr, **stats, "train_seconds": round(time.time() - t, 3)}
    return Phase("fine-tune", cfg["epochs"], train_epoch, lambda: ctx.evaluate(model), setup=setup)


@register("fmp", "defense", paper="Huang & Bu, ICLR 2024", needs=("trained_model", "clean_subset"), options=OPTIONS,
          summary="Adversarial Feature Map Pruning: prune the maps whose FGSM perturbation hurts most, fine-tune")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("fmp", OPTIONS, argv, __doc__, dataset=dataset)
    if cfg["rank_conv2_as_block_output"]:
        args.deviations.append("rank_conv2_as_block_output: each PreAct block's conv2 ranked by the block output and "
                               "the following gammas zeroed, as the original's in-place add (spec §5, defects 11-12)")
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("fmp", cfg, args)
    run = ctx.run
    try:
        x_sub, y_sub, sub_idx = ctx.clean_subset(cfg["ratio"], balanced=True, index_file=cfg["index"])
        model = ctx.attacked_model()
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                              **fused(params))
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg["epochs"], 1), eta_min=cfg["eta_min"])
                 if cfg["lr_scheduler"] == "CosineAnnealingLR" else None)
        state = {"model": model, "optimizer": opt, "scheduler": sched, "precision": ctx.precision,
                 "shuffle_gen": GeneratorState(generator(cfg["random_seed"], "fmp_shuffle")),
                 "aug_gen": GeneratorState(generator(cfg["random_seed"], "fmp_augment"))}
        rows = fit(run, [prune_phase(ctx, model, x_sub, y_sub, sub_idx, state),
                         finetune_phase(ctx, model, x_sub, y_sub, state)], state)
        return finish_fmp(ctx, model, rows)
    finally:
        run.close()


def finish_fmp(ctx, model, rows):
    plan = read_json(ctx.run.path / "pruned.json", "record file")
    tuned = [r for r in rows if r["epoch"] >= 1]
    finetune_seconds = round(sum(r.get("train_seconds") or 0 for r in tuned), 3)
    print(f"ranking time {plan['ranking_seconds']:.2f}s, fine-tuning time {finetune_seconds:.2f}s "
          f"({len(tuned)} epochs, evaluation excluded)")
    after = rows[0]
    extra = {"ranking_seconds": plan["ranking_seconds"], "finetune_seconds": finetune_seconds,
             "n_pruned": plan["n_pruned"], "n_maps": plan["n_maps"], "pruned_per_layer": plan["pruned_per_layer"],
             "layers_not_pruned": plan["layers_not_pruned"], "bn_gamma_zeroed": len(plan["bn_zeroed"]),
             "pruned_test_acc": after["test_acc"], "pruned_test_asr": after["test_asr"],
             "pruned_test_ra": after["test_ra"]}
    return finish_defense(ctx, rows, ctx.plain_payload(model), extra)


if __name__ == "__main__":
    run_main(main)
