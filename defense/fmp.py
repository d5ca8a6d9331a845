"""FMP, Adversarial Feature Map Pruning (Huang and Bu, "Adversarial Feature Map Pruning for Backdoor",
ICLR 2024, arXiv 2307.11565; spec: ../shared/specs/fmp.md).

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
several maps per backward with `grad_mode: batched`), not from a re-run of the network per map; they are
computed in fp32. On a 2-core CPU the per-map loop measured faster than the batched products (vmap); on a GPU,
where the loop pays one kernel launch series per map, try `--grad_mode batched`.
Scoring the crafted images runs in the run's precision, as every evaluation.
"""
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402
from torch import nn  # noqa: E402

from utils.config import Opt, in_range  # noqa: E402
from utils.data import dataset_info  # noqa: E402
from utils.defense import defense_config, finish_defense, open_defense  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402
from utils.io import read_json  # noqa: E402
from utils.seeding import generator  # noqa: E402
from utils.train import GeneratorState, eval_mode, fit, random_crop_flip, to_unit, train_epoch_supervised  # noqa: E402

ORIGINAL_PRUNE_RATIO = 1 / 64  # the original keeps `len // 2**6` maps per layer

OPTIONS = [
    Opt("ratio", float, 0.1, "clean fraction of the training set, class-balanced: floor(N*ratio/K) per class",
        check=in_range(0, 1, lo_open=True)),
    Opt("index", str, None, "a file of training indices (one per line) used as the clean subset instead of a draw"),
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
    Opt("grad_mode", str, "loop", "per-map gradients from the shared graph: one backward per map (loop; the faster "
        "on CPU) or batched vector-Jacobian products, map_chunk maps per backward (batched)",
        choices=("loop", "batched")),
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


# --- 1. the convolutions, in forward order --------------------------------------------------------------

class ConvRecorder:
    """Forward hooks on every nn.Conv2d: records each call's output in forward-execution order. A module called
    twice in one pass is an error (its maps would be ambiguous); modules never called are reported by the caller."""

    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        self.calls = []  # (name, module, output, output version at hook time)
        self.handles = []

    def __enter__(self):
        self.calls = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.names]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, module, inputs, output):
        name = self.names[module]
        if any(c[1] is module for c in self.calls):
            raise UserError(f"FMP needs each Conv2d called once per forward pass; {name} is called again")
        self.calls.append((name, module, output, output._version))

    def outputs(self):
        """The recorded outputs, checked: an in-place operation after the conv would have changed its map."""
        for name, _, out, version in self.calls:
            if out._version != version:
                raise UserError(f"the output of {name} is modified in place later in the forward pass; FMP needs the "
                                "raw convolution output (make the following operation out-of-place)")
        return [(name, module, out) for name, module, out, _ in self.calls]

    @property
    def uncalled(self):
        called = {c[1] for c in self.calls}
        return [n for m, n in self.names.items() if m not in called]


@torch.no_grad()
def conv_layers(model, x):
    """[(name, module, out_channels)] of every Conv2d in forward order, and the names of those never called."""
    with eval_mode(model), ConvRecorder(model) as rec:
        model(x)
    return [(n, m, m.out_channels) for n, m, _ in rec.outputs()], rec.uncalled


# --- 2. random start and the per-map FGSM step ----------------------------------------------------------

def random_start(x, alpha, gen):
    """x0 = clip(x + alpha * sign(U(-alpha, alpha)), 0, 1): one independent +-alpha per pixel."""
    u = (torch.rand(x.shape, generator=gen, device=gen.device).to(x.device) * 2 - 1) * alpha
    return (x + alpha * torch.sign(u)).clamp(0, 1)


def map_gradients(out, clean, x0, channels, mode="loop"):
    """Gradients w.r.t. x0 of L_c = mean_{b,h,w} (F_c(x0) - F_c(x))^2 for each channel c, from the graph that
    produced `out` = F(x0) (retained). Returns (len(channels), *x0.shape)."""
    if mode == "loop":
        grads = [torch.autograd.grad((out[:, c] - clean[:, c]).pow(2).mean(), x0, retain_graph=True)[0]
                 for c in channels]
        return torch.stack(grads)
    # dL_c / dF = 2 (F_c(x0) - F_c(x)) / (B H W) on channel c, zero elsewhere; one batched VJP for all of them
    b, _, h, w = out.shape
    diff = (out.detach() - clean) * (2.0 / (b * h * w))
    ch = torch.as_tensor(channels, device=out.device)
    seeds = torch.zeros((len(channels),) + tuple(out.shape), dtype=out.dtype, device=out.device)
    seeds[torch.arange(len(channels), device=out.device), :, ch] = diff[:, ch].transpose(0, 1)
    return torch.autograd.grad(out, x0, seeds, retain_graph=True, is_grads_batched=True)[0]


def fgsm_step(x0, grads, eps):
    """x_adv = clip(x0 + eps * sign(g), 0, 1), one per gradient: an ascent step, no projection onto a ball."""
    return (x0.unsqueeze(0) + eps * grads.sign()).clamp(0, 1)


@torch.no_grad()
def correct_counts(model, x_adv, y, precision=None):
    """How many of each map's B crafted images are still classified correctly: one stacked eval forward."""
    k, b = x_adv.shape[:2]
    xb = x_adv.reshape(k * b, *x_adv.shape[2:])
    if precision is not None:
        with precision.autocast():
            logits = model(precision.prepare_input(xb))
    else:
        logits = model(xb)
    return (logits.float().argmax(1).view(k, b) == y.unsqueeze(0)).sum(1)


class frozen_parameters:
    """Parameters do not require grad inside: the traced graph then only keeps what d/dx0 needs."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def rank_feature_maps(model, x, y, x0, eps, mode="loop", chunk=16, precision=None):
    """Score every feature map of every Conv2d: accuracy on the FGSM image that moves that one map.
    The clean maps F(x) come from one no-grad forward, F(x0) from one traced forward; every map's gradient
    is taken from that one graph. Returns [(name, module, scores (C,) float64)] in forward order."""
    b = len(y)
    with eval_mode(model), frozen_parameters(model):  # BN on running statistics, nothing updated
        with torch.no_grad(), ConvRecorder(model) as rec:
            model(x)
        clean_calls = rec.outputs()
        clean = [out for _, _, out in clean_calls]
        x0 = x0.detach().clone().requires_grad_(True)
        with torch.enable_grad(), ConvRecorder(model) as rec:
            model(x0)
        traced = rec.outputs()
        if [n for n, _, _ in traced] != [n for n, _, _ in clean_calls]:
            raise UserError("the convolutions ran in a different order on the clean and the perturbed pass")
        result = []
        for (name, module, out), cl in zip(traced, clean):
            correct = torch.zeros(out.shape[1], dtype=torch.int64, device=out.device)
            for start in range(0, out.shape[1], chunk):
                chans = list(range(start, min(start + chunk, out.shape[1])))
                x_adv = fgsm_step(x0.detach(), map_gradients(out, cl, x0, chans, mode), eps)
                correct[start:start + len(chans)] = correct_counts(model, x_adv, y, precision)
            result.append((name, module, correct.double().cpu() / b))
        del traced, clean
    return result


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
def bn_after_conv(model, x):
    """{conv name: [BatchNorm2d names]} for the BNs whose input, in a traced forward pass, is exactly the output
    tensor of that conv (pre-activation: conv1 -> bn2 of its block, the stem -> the first block's bn1; a conv
    whose output is summed first has none; post-activation ResNet: every conv -> its own BN)."""
    bns = {m: n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    produced, mapping = {}, {}

    def bn_hook(module, inputs):
        src = produced.get(id(inputs[0]))
        if src is not None and src[0] is inputs[0]:
            mapping.setdefault(src[1], []).append(bns[module])

    convs = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    def conv_hook(module, inputs, output):
        produced[id(output)] = (output, convs[module])  # the tensor is kept, so its id stays unique

    handles = [m.register_forward_pre_hook(bn_hook) for m in bns] + [m.register_forward_hook(conv_hook) for m in convs]
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
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
    print(f"ranking {total} feature maps of {len(layers)} Conv2d layers on {len(y)} clean images "
          f"(alpha {cfg['alpha']}, eps {cfg['eps']}, {cfg['grad_mode']} gradients, {cfg['map_chunk']} maps per chunk)")
    t0 = time.time()
    ranked = rank_feature_maps(model, x, y, x0, cfg["eps"], cfg["grad_mode"], cfg["map_chunk"], ctx.precision)
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

    bn_map = bn_after_conv(model, x[:1]) if cfg["bn_gamma"] == "identity" else {}
    bn_zeroed = prune(model, selection, bn_map)
    print(f"pruned {len(selection)} of {total} feature maps; BatchNorm gammas zeroed: {len(bn_zeroed)}")

    run.write_file("ranking.csv", "module,position,channel,score,pruned\n" + "".join(rows))
    plan = {"selected": [{"module": n, "channel": c} for n, c in selection],
            "bn_zeroed": [{"bn": b, "channel": c} for b, c in bn_zeroed],
            "pruned_per_layer": per_layer, "layers_not_pruned": not_pruned, "n_pruned": len(selection),
            "n_maps": total, "uncalled_convs": uncalled, "ranking_seconds": round(rank_seconds, 3),
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


def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    return defense_config("fmp", OPTIONS, argv, __doc__, dataset=dataset)


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("fmp", cfg, args)
    run = ctx.run
    try:
        x_sub, y_sub, sub_idx = ctx.clean_subset(cfg["ratio"], balanced=True, index_file=cfg["index"])
        model = ctx.attacked_model()
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"])
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg["epochs"], 1), eta_min=cfg["eta_min"])
                 if cfg["lr_scheduler"] == "CosineAnnealingLR" else None)
        shuffle_gen, aug_gen = generator(cfg["random_seed"], "fmp_shuffle"), generator(cfg["random_seed"], "fmp_augment")
        state = {"model": model, "optimizer": opt, "scheduler": sched, "precision": ctx.precision,
                 "shuffle_gen": GeneratorState(shuffle_gen), "aug_gen": GeneratorState(aug_gen)}

        if (run.path / "checkpoint.pt").exists():  # --resume: ranking and pruning are done, the checkpoint has them
            if not (run.path / "pruned.json").exists():
                raise UserError(f"{run.path} has a checkpoint but no pruned.json; pass --overwrite to start again")
            plan = read_json(run.path / "pruned.json")
        else:
            t0 = time.time()
            plan = rank_and_prune(ctx, model, x_sub, y_sub, sub_idx)
            row = {"epoch": 0, "lr": None, "seconds": None, "train_loss": None, "train_acc": None, **ctx.evaluate(model)}
            row["seconds"] = round(time.time() - t0, 3)
            run.log_epoch(row, "after pruning, epoch")
            run.save_checkpoint(0, state)  # a later --resume starts from the pruned model and skips the ranking
            run.restore_checkpoint = lambda _state: 0  # this run holds that state already: nothing to reload
        run.update_meta(rank_batch_indices=plan["rank_batch_indices"])

        hflip = dataset_info(ctx.record.config["dataset"]).hflip if cfg["hflip"] is None else cfg["hflip"]
        augment = lambda xb: random_crop_flip(xb, aug_gen, cfg["crop_padding"], hflip)
        after_step = zero_mask(model, plan) if cfg["hard_prune"] else None

        def train_epoch(epoch):
            t = time.time()
            lr = opt.param_groups[0]["lr"]
            stats, _, _ = train_epoch_supervised(model, x_sub, y_sub, opt, ctx.precision, shuffle_gen, cfg["batch_size"],
                                                 False, augment, desc=f"fmp fine-tune {epoch}", after_step=after_step)
            if sched is not None:
                sched.step()
            return {"lr": lr, **stats, "train_seconds": round(time.time() - t, 3)}

        rows = fit(run, cfg["epochs"], train_epoch, lambda: ctx.evaluate(model), state)
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
    finally:
        run.close()


if __name__ == "__main__":
    run_main(main)
