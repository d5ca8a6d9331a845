"""The fine-tuning family of backdoor purification: FT, LP, FE-tuning, FT-init and FST.

Feature Shift Tuning (Min, Qin, Shen, Cheng, NeurIPS 2023, arXiv 2310.01875): plain tuning on a little clean data
removes a backdoor at high poisoning rates, not at low ones, where backdoor and clean features stay entangled. FST
re-initialises the linear head and, tuning the whole network, penalises <w, w_ori> with the compromised head, the
head's norm held at C = ||w_ori||_F. The paper's four simpler modes share the loop:

    ft  all parameters, head kept | lp  head only | fe-tuning  all but a re-initialised, frozen head
    ft-init  all parameters, head re-initialised | fst  as ft-init, + alpha * <w, w_ori>

    python defense/ft.py --result_file badnet_demo --ft_mode fst     (defense/fst.py: the same, fst fixed)
    python defense/ft.py --result_file badnet_demo --yaml_path config/defense/ft/backdoorbench_fashion_mnist.yaml

The last line is BackdoorBench's FT baseline (mode ft, its recipe; output defense/ft-bb/). Spec:
docs/specs/ft_family.md.
"""
import math

import torch
import torch.nn.functional as F

from utils.config import Opt, in_range
from utils.defense import defense_config, finish_defense, open_defense
from utils.errors import UserError, run_main
from utils.seeding import generator
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.epoch import batch_indices, progress, weighted_sum
from utils.engine.optim import fused
from utils.engine.loop import GeneratorState, Phase, fit
from utils.options import clean_subset_options
from utils.registry import register

MODES = ("ft", "lp", "fe-tuning", "ft-init", "fst")
REINIT = {"fe-tuning", "ft-init", "fst"}            # modes that start from a fresh random head
TRAINS_BACKBONE = {"ft", "fe-tuning", "ft-init", "fst"}
TRAINS_HEAD = {"ft", "lp", "ft-init", "fst"}
SCHEDULERS = ("CosineAnnealingLR", "ReduceLROnPlateau")


OPTIONS = [
    Opt("ft_mode", str, None, "tuning mode (required): " + ", ".join(MODES), choices=MODES),
    Opt("epochs", int, 10, "tuning epochs", check=in_range(1)),
    Opt("lr", float, 0.01, "initial SGD learning rate", check=in_range(0, lo_open=True)),
    Opt("alpha", float, 0.2, "weight of FST's inner-product penalty alpha * <w, w_ori> (fst only)", check=in_range(0)),
    Opt("batch_size", int, 128, "tuning batch size (shuffled, last batch kept)", check=in_range(1)),
    Opt("momentum", float, 0.9, "SGD momentum", check=in_range(0, 1)),
    Opt("weight_decay", float, 0.0, "SGD weight decay (the FST original uses none)", check=in_range(0)),
    Opt("lr_scheduler", str, "CosineAnnealingLR", "per-epoch lr schedule: cosine, or ReduceLROnPlateau on the "
        "epoch's mean training loss (BackdoorBench's FT on tiny)", choices=SCHEDULERS),
    Opt("cos_t_max", int, None, "T_max of the per-epoch cosine schedule (default: epochs)",
        check=lambda v: None if v is None or v >= 1 else "allowed: none (= epochs) or an integer >= 1"),
    Opt("plateau_factor", float, 0.1, "ReduceLROnPlateau: lr multiplier on a plateau (torch's default, as in "
        "BackdoorBench)", check=in_range(0, 1, lo_open=True, hi_open=True)),
    Opt("plateau_patience", int, 10, "ReduceLROnPlateau: epochs without improvement of the training loss tolerated "
        "before the lr is cut (torch's default, as in BackdoorBench)", check=in_range(0)),
    *clean_subset_options(ratio=0.02, ratio_key="split_ratio", balanced=True, what="clean tuning data"),
    Opt("project_head_norm", bool, True, "after every step, in every mode, rescale the head weight to norm C"),
    Opt("reinit_rescale", bool, False, "rescale a re-initialised head to norm C at once (BackdoorBenchER)"),
    Opt("freeze_bn_stats", bool, False, "BatchNorm layers of frozen parts run in eval mode (no statistics update)"),
    Opt("lb_smooth", float, None, "label smoothing of the cross-entropy (none: off)",
        check=lambda v: None if v is None or 0 <= v < 1 else "allowed: none or [0, 1)"),
    Opt("crop_padding", int, 4, "random-crop padding of the tuning augmentation (0: no crop)", check=in_range(0)),
    Opt("hflip", bool, None, "random horizontal flip (default: the dataset's rule, on for cifar10 only)"),
    Opt("out_name", str, None, "output folder under <record>/defense/ (default: the ft_mode)"),
]


# --- the head: re-initialisation, trainable sets, penalty, norm projection ---------------------------------------

def reinit_head(head: torch.nn.Linear, gen: torch.Generator):
    """Weight and bias ~ U(-1/sqrt(d), 1/sqrt(d)), PyTorch's default Linear range, from the defense's generator."""
    bound = 1 / math.sqrt(head.in_features)
    with torch.no_grad():
        for p in (head.weight, head.bias):
            r = torch.rand(p.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
            p.copy_(r.to(p.device, p.dtype))


def set_trainable(model, mode: str):
    """requires_grad per mode (spec §2); returns the parameters the optimiser updates."""
    for p in model.backbone_parameters():
        p.requires_grad_(mode in TRAINS_BACKBONE)
    for p in model.head_parameters():
        p.requires_grad_(mode in TRAINS_HEAD)
    return [p for p in model.parameters() if p.requires_grad]


def frozen_batchnorms(model):
    """BatchNorm layers whose affine parameters are all frozen: the ones `freeze_bn_stats` keeps in eval mode."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters(recurse=False))]


def fst_penalty(w: torch.Tensor, w_ori: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * <w, w_ori>: the raw Frobenius inner product (no normalisation), in fp32. Its gradient with
    respect to w is the constant alpha * w_ori, which turns the head away from the compromised direction."""
    return alpha * (w.float() * w_ori.float()).sum()


@torch.no_grad()
def project_head_norm_(head: torch.nn.Linear, norm: float):
    """w <- w * C / ||w||_F; the bias is untouched."""
    head.weight.mul_(norm / head.weight.float().norm())


def smoothed_cross_entropy(logits, y, eps: float) -> torch.Tensor:
    """The FST original's label smoothing (spec §6, defect 10): target 1 - eps on the true class and eps / (K - 1)
    on each other one, in fp32. PyTorch's built-in puts eps / K on every class (1 - eps + eps / K on the true one)."""
    logp = logits.float().log_softmax(1)
    target = torch.full_like(logp, eps / (logp.shape[1] - 1)).scatter_(1, y.unsqueeze(1), 1.0 - eps)
    return -(target * logp).sum(1).mean()


def tuning_loss(logits, y, head_weight, w_ori, mode: str, alpha: float, lb_smooth):
    """(total, ce, reg). Label smoothing acts on the CE only; the FST term stays (spec §6, item 3).
    lb_smooth none (or 0): plain cross-entropy, exactly as without the option."""
    ce = smoothed_cross_entropy(logits, y, lb_smooth) if lb_smooth else F.cross_entropy(logits.float(), y)
    reg = fst_penalty(head_weight, w_ori, alpha) if mode == "fst" else torch.zeros((), device=ce.device)
    return ce + reg, ce, reg


def make_schedule(optimizer, cfg):
    """Cosine (the FST original's, and BackdoorBench's on cifar10/cifar100/gtsrb), or ReduceLROnPlateau in mode min
    (BackdoorBench's config/defense/ft/tiny.yaml, built by its factory with torch's defaults)."""
    if cfg["lr_scheduler"] == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg["plateau_factor"],
                                                          patience=cfg["plateau_patience"])
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["cos_t_max"] or cfg["epochs"])


class Tuner:
    """The attacked model prepared for one mode: w_ori and C taken before anything changes, the head
    re-initialised where the mode says, parameters frozen, optimiser and lr schedule over the rest."""

    def __init__(self, model, cfg, precision):
        self.model, self.cfg, self.precision, self.mode = model, cfg, precision, cfg["ft_mode"]
        head = model.head
        self.w_ori = head.weight.detach().clone().float()
        self.norm = self.w_ori.norm().item()                      # C
        if self.mode in REINIT:
            reinit_head(head, generator(cfg["random_seed"], "head_reinit"))
            if cfg["reinit_rescale"]:
                project_head_norm_(head, self.norm)
        self.params = set_trainable(model, self.mode)
        self.bn_frozen = frozen_batchnorms(model) if cfg["freeze_bn_stats"] else []
        self.optimizer = torch.optim.SGD(self.params, lr=cfg["lr"], momentum=cfg["momentum"],
                                         weight_decay=cfg["weight_decay"], **fused(self.params))
        self.scheduler = make_schedule(self.optimizer, cfg)

    def train_mode(self):
        # BN statistics update in every mode, as in the original; freeze_bn_stats is the opt-out
        self.model.train()
        for m in self.bn_frozen:
            m.eval()

    def step(self, xb, yb):
        with self.precision.autocast():
            logits = self.model(self.precision.prepare_input(xb))
        loss, ce, reg = tuning_loss(logits, yb, self.model.head.weight, self.w_ori, self.mode, self.cfg["alpha"],
                                    self.cfg["lb_smooth"])
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.step(loss, self.optimizer)
        if self.cfg["project_head_norm"]:
            project_head_norm_(self.model.head, self.norm)
        return logits.detach(), ce.detach(), reg.detach()

    def scheduler_step(self, mean_loss: float):
        """Once per epoch; ReduceLROnPlateau watches the epoch's mean training loss."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(mean_loss)
        else:
            self.scheduler.step()

    def epoch(self, x, y, shuffle_gen, augment):
        """One pass over the tuning set, then the scheduler step. Returns the epoch's row of training stats."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.train_mode()
        # float64 sums on the device, read back once (the same arithmetic as Python floats, no sync per step)
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        ce_sum, reg_sum, correct, batch_loss, seen, batches = zero, zero, zero, zero, 0, 0
        for idx in progress(batch_indices(len(y), self.cfg["batch_size"], shuffle_gen, device=x.device), self.mode):
            logits, ce, reg = self.step(augment(to_unit(x[idx])), y[idx])
            n = len(idx)
            ce_sum, reg_sum = weighted_sum(ce_sum, ce, n), weighted_sum(reg_sum, reg, n)
            correct = weighted_sum(correct, (logits.argmax(1) == y[idx]).float().mean(), n)
            batch_loss = batch_loss + ce.double() + reg.double()
            seen, batches = seen + n, batches + 1
        ce_sum, reg_sum, correct, batch_loss = torch.stack([ce_sum, reg_sum, correct, batch_loss]).tolist()
        # the plateau watches the mean over batches of the batch loss, as BackdoorBench's trainer does
        self.scheduler_step(batch_loss / batches)
        ce, reg = ce_sum / seen, reg_sum / seen
        row = {"lr": lr, "train_loss": ce + reg, "train_ce": ce}
        if self.mode == "fst":
            row["train_reg"] = reg
        return {**row, "train_acc": correct / seen, **self.head_stats()}

    @torch.no_grad()
    def head_stats(self):
        w = self.model.head.weight.float()
        return {"head_norm": w.norm().item(),
                "head_cos": (w * self.w_ori).sum().item() / (w.norm().item() * self.norm + 1e-12)}


# --- main -----------------------------------------------------------------------------------------------------

# The spec's per-dataset values (ft_family.md §4; the options' defaults are the cifar10 row) and the BackdoorBench
# FT baseline's (§7): a run that departs from them lists the difference under 'deviations' in config.yaml.
SPEC_BY_DATASET = {
    "gtsrb": {"epochs": 15, "alpha": 0.1},
    "cifar100": {"epochs": 15, "lr": 0.001, "alpha": 0.001, "split_ratio": 0.05},
    "tiny": {"epochs": 15, "lr": 0.001, "alpha": 0.001, "split_ratio": 0.05},
}
SPEC_FT_BB = {"ft_mode": "ft", "out_name": "ft-bb", "epochs": 100, "batch_size": 256, "lr": 0.01,
              "weight_decay": 5e-4, "lr_scheduler": "CosineAnnealingLR", "cos_t_max": 100, "split_ratio": 0.05,
              "balanced": False, "project_head_norm": False}
# tiny (BackdoorBench's config/defense/ft/tiny.yaml): 200 epochs, ReduceLROnPlateau with torch's factor and
# patience, stepped on the epoch's mean training loss; no cosine, so cos_t_max is unused (none)
SPEC_FT_BB_TINY = {**{k: v for k, v in SPEC_FT_BB.items() if k != "cos_t_max"}, "epochs": 200,
                   "lr_scheduler": "ReduceLROnPlateau", "plateau_factor": 0.1, "plateau_patience": 10}


def spec_for(cfg, dataset):
    chosen = {"ft_mode": cfg["ft_mode"], "out_name": cfg["out_name"]}   # choices, not deviations
    if cfg["out_name"] == "ft-bb":   # the dataset's row under it: mode ft ignores alpha, so its value is no deviation
        bb = SPEC_FT_BB_TINY if dataset == "tiny" else SPEC_FT_BB
        return {**SPEC_BY_DATASET.get(dataset, {}), **bb, **chosen}
    return {**SPEC_BY_DATASET.get(dataset, {}), **chosen}


MODE_SUMMARIES = {"ft": "vanilla fine-tuning of the whole model on clean data",
                  "lp": "linear probing: the head alone retrained on clean data",
                  "fe-tuning": "FE-tuning: a new head frozen, the feature extractor tuned",
                  "ft-init": "FT-init: a re-initialised head, the whole model tuned"}   # fst: defense/fst.py


def configure(argv=None, dataset=None, fixed_mode=None, description=__doc__):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this).
    fixed_mode: set by defense/fst.py, which is this code with ft_mode = fst."""
    name = "fst" if fixed_mode == "fst" else "ft"
    cfg, args = defense_config(name, OPTIONS, argv, description, config_dir="ft", spec_for=spec_for, dataset=dataset,
                               fixed={"ft_mode": fixed_mode} if fixed_mode else None)
    if cfg["ft_mode"] is None:
        raise UserError("--ft_mode is required: one of " + ", ".join(MODES) +
                        " (e.g. `python defense/ft.py --result_file badnet_demo --ft_mode fst`)")
    if cfg["out_name"] == "ft-bb" and cfg["ft_mode"] != "ft":
        raise UserError(f"out_name ft-bb is BackdoorBench's FT baseline, a configuration of ft_mode ft (got "
                        f"{cfg['ft_mode']}); drop --ft_mode or choose another --out_name")
    return cfg, args


for _mode, _summary in MODE_SUMMARIES.items():
    register(_mode, "defense", "Min et al., NeurIPS 2023", _summary, OPTIONS, ("trained_model", "clean_subset"),
             args=("--ft_mode", _mode))(configure)
register("ft-bb", "defense", "BackdoorBench (Wu et al., NeurIPS 2022)", "BackdoorBench's FT baseline (mode ft, its "
         "recipe)", OPTIONS, ("trained_model", "clean_subset"), out="ft-bb", listed=False,
         args=("--yaml_path", "config/defense/ft/backdoorbench_{dataset}.yaml"),
         requires=("config/defense/ft/backdoorbench_{dataset}.yaml",))(configure)


def main(argv=None, fixed_mode=None, description=__doc__):
    cfg, args = configure(argv, fixed_mode=fixed_mode, description=description)
    mode = cfg["ft_mode"]
    t_max = cfg["cos_t_max"] or cfg["epochs"]
    notes = []
    if cfg["lr_scheduler"] == "CosineAnnealingLR" and cfg["epochs"] > t_max:
        notes.append(f"cos_t_max {t_max} < epochs {cfg['epochs']}: the cosine schedule climbs back towards lr "
                          f"{cfg['lr']} after epoch {t_max} (BackdoorBench's fixed T_max, reproduced)")
    ctx = open_defense(cfg["out_name"] or mode, cfg, args)
    try:
        for n in notes:
            print(f"note: {n}")
        ctx.run.update_meta(notes=notes)
        x, y, idx = ctx.clean_subset(cfg["split_ratio"], cfg["balanced"], cfg["index"])
        model = ctx.attacked_model()
        tuner = Tuner(model, cfg, ctx.precision)
        print(f"{mode}: head {model.feature_dim} -> {model.num_classes}, C = ||w_ori||_F = {tuner.norm:.4f}; "
              f"{sum(p.numel() for p in tuner.params)} of {sum(p.numel() for p in model.parameters())} parameters "
              f"trainable{'; head re-initialised' if mode in REINIT else ''}")
        shuffle_gen = generator(cfg["random_seed"], "shuffle")
        aug_gen = generator(cfg["random_seed"], "augmentation")
        hflip = ctx.record.dataset.info.hflip if cfg["hflip"] is None else cfg["hflip"]
        augment = lambda b: random_crop_flip(b, aug_gen, cfg["crop_padding"], hflip)
        state = {"model": model, "optimizer": tuner.optimizer, "scheduler": tuner.scheduler, "precision": ctx.precision,
                 "shuffle_gen": GeneratorState(shuffle_gen), "aug_gen": GeneratorState(aug_gen)}
        rows = fit(ctx.run, Phase("tune", cfg["epochs"], lambda e: tuner.epoch(x, y, shuffle_gen, augment),
                                  lambda: ctx.evaluate(model)), state)
        last = rows[-1]
        return finish_defense(ctx, rows, ctx.plain_payload(model),
                              {"ft_mode": mode, "alpha": cfg["alpha"] if mode == "fst" else None,
                               "head_norm_C": tuner.norm, "head_norm": last["head_norm"], "head_cos": last["head_cos"],
                               "clean_subset_size": len(idx), "epochs": cfg["epochs"]},
                              curves_title=f"{cfg['out_name'] or mode} on {ctx.record.path.name}")
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
