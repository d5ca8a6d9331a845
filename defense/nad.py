"""NAD, Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing
Backdoor Triggers from Deep Neural Networks", ICLR 2021, arXiv 2101.05930; spec: docs/specs/nad.md).

Fine-tuning a backdoored model on a little clean data weakens the backdoor; NAD uses that fine-tuned model as a
teacher only. The backdoored model itself (the student) is fine-tuned again on the same clean data with an extra
loss that pulls its attention maps (sum over channels of |F|^p, L2-normalised per image) at a few stages onto the
teacher's. Two engine phases, so --resume continues in the right one:

    teacher (BackdoorBench's fine-tuning recipe, te_epochs) -> nad (CE + sum_l beta_l AT_l, nad_epochs)

    python defense/nad.py --result_file badnet_demo
    python defense/nad.py --result_file badnet_demo --yaml_path config/defense/nad/backdoorbench_effective.yaml

Project decisions (spec §7): stages by name (default the last three, layer2..layer4, betas 500/1000/1000), one
student forward per step with hooks (not BackdoorBench's four truncated passes), separate te_epochs / nad_epochs,
the student's lr rule with its constants as keys, the last epoch is the result (no selection on test figures),
the teacher frozen and in eval mode, the losses in fp32.
"""
import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.config import Opt, in_range
from utils.defense import check_classes, defense_config, finish_defense, open_defense
from utils.engine.augment import cutout, random_crop_flip, to_unit
from utils.engine.epoch import batch_indices, progress, train_epoch_supervised, weighted_sum
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import fused, make_scheduler, scheduler_step, set_lr
from utils.errors import UserError, run_main
from utils.metrics import der
from utils.model_file import load_model_file
from utils.options import SCHEDULERS, clean_subset_options
from utils.registry import register
from utils.seeding import generator
from utils.stages import Recorder

EPS = 1e-6   # added to each map's L2 norm (both originals)


def names(v):
    """'layer2,layer3' or a YAML list -> ['layer2', 'layer3']."""
    items = v if isinstance(v, (list, tuple)) else str(v).strip("[] ").replace(" ", "").split(",")
    out = [str(s) for s in items if str(s)]
    if not out:
        raise ValueError("expected stage names, e.g. layer2,layer3,layer4")
    return out


def numbers(v):
    """'500,1000' or a YAML list -> [500.0, 1000.0], each >= 0."""
    items = v if isinstance(v, (list, tuple)) else [s for s in str(v).strip("[] ").replace(" ", "").split(",") if s]
    if isinstance(v, bool) or not items or any(isinstance(s, bool) for s in items):
        raise ValueError("expected numbers, e.g. 500,1000,1000")
    out = [float(s) for s in items]
    if not all(math.isfinite(b) and b >= 0 for b in out):
        raise ValueError("expected finite numbers >= 0")
    return out


positive = in_range(0, lo_open=True)
OPTIONS = [
    *clean_subset_options(ratio=0.05, balanced=False),
    Opt("allow_missing_classes", bool, False, "go on when the clean subset lacks a class"),
    Opt("te_epochs", int, 10, "teacher fine-tuning epochs", check=in_range(1)),
    Opt("nad_epochs", int, 10, "student (attention distillation) epochs", check=in_range(1)),
    Opt("batch_size", int, 256, "batch size of both phases (shuffled, last batch kept)", check=in_range(1)),
    Opt("lr", float, 0.01, "teacher's initial lr; student's lr in epochs 1-2", check=positive),
    Opt("lr_mid", float, 0.01, "student's lr in epochs 3-20", check=positive),
    Opt("lr_late", float, 1e-4, "student's lr from epoch 21 on", check=positive),
    Opt("sgd_momentum", float, 0.9, "SGD momentum (both phases)", check=in_range(0, 1, hi_open=True)),
    Opt("wd", float, 5e-4, "SGD weight decay (both phases)", check=in_range(0)),
    Opt("nesterov", bool, False, "Nesterov momentum (both phases; the authors: true)"),
    Opt("teacher_schedule", str, "recipe", "teacher's lr: recipe (lr_scheduler below) or steps (the student's rule)",
        choices=("recipe", "steps")),
    Opt("lr_scheduler", str, "CosineAnnealingLR", "teacher's schedule, stepped once per epoch",
        choices=tuple(s for s in SCHEDULERS if s != "MultiStepLR")),
    Opt("cos_t_max", int, 100, "T_max of the teacher's cosine (BackdoorBench: 100 whatever the epochs)",
        check=in_range(1)),
    Opt("eta_min", float, 0.0, "lowest lr of the teacher's cosine", check=in_range(0)),
    Opt("plateau_factor", float, 0.1, "ReduceLROnPlateau: factor of each reduction",
        check=in_range(0, 1, lo_open=True, hi_open=True)),
    Opt("plateau_patience", int, 10, "ReduceLROnPlateau: epochs without improvement of the training loss",
        check=in_range(0)),
    Opt("at_stages", names, ["layer2", "layer3", "layer4"], "stages whose attention is distilled, in forward order"),
    Opt("betas", numbers, [500.0, 1000.0, 1000.0], "beta_l of each stage, in the order of at_stages"),
    Opt("p", float, 2.0, "attention exponent: sum over channels of |F|^p", check=positive),
    Opt("crop_padding", int, 4, "random-crop padding of both phases (0: no crop)", check=in_range(0)),
    Opt("hflip", bool, None, "random horizontal flip (default: the dataset's rule, cifar10 only)"),
    Opt("cutout_length", int, 0, "Cutout hole of both phases (0: off; the authors: 3, a 2x2 hole)", check=in_range(0)),
    Opt("teacher_model", str, None, "a weights-only model.pt of the record's architecture used as the teacher; "
        "skips the teacher phase"),
    Opt("out_name", str, None, "output folder under <record>/defense/ (default: nad)"),
    # the originals' names, refused with a pointer (yaml only)
    *(Opt(k, lambda v: v, None, "", cli=False) for k in ("epochs", "momentum", "weight_decay", "beta1", "beta2",
                                                          "beta3", "teacher_model_loc")),
]
REFUSED = {"epochs": "use te_epochs (teacher) and nad_epochs (student)",
           "momentum": "SGD momentum is sgd_momentum", "weight_decay": "weight decay is wd",
           "beta1": "the betas are one list, betas, in the order of at_stages",
           "teacher_model_loc": "a teacher from a file is teacher_model (a weights-only model.pt)"}
REFUSED["beta2"] = REFUSED["beta3"] = REFUSED["beta1"]
SPEC = {"tiny": {"batch_size": 128, "lr_scheduler": "ReduceLROnPlateau"}}   # BackdoorBench's tiny.yaml (spec §3.1)


# --- 1. attention maps and the distillation loss -------------------------------------------------------------------

def attention_map(f, p=2.0):
    """(B, h*w): a_b = sum_c |F_b,c|^p, divided by its L2 norm over the positions plus EPS; fp32."""
    a = f.float().abs().pow(p).sum(1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + EPS)


def at_loss(f_student, f_teacher, p=2.0):
    """Mean over B * h * w of the squared difference of the normalised maps (F.mse_loss, both originals)."""
    return F.mse_loss(attention_map(f_student, p), attention_map(f_teacher, p))


def nad_loss(logits, y, feats_s, feats_t, betas, p=2.0):
    """(CE + sum_l beta_l AT_l, CE, [AT_l unweighted]), all fp32."""
    ce = F.cross_entropy(logits.float(), y)
    ats = [at_loss(s, t, p) for s, t in zip(feats_s, feats_t)]
    return ce + sum(b * a for b, a in zip(betas, ats)), ce, ats


# --- 2. learning rates --------------------------------------------------------------------------------------------

def step_lr(k, cfg):
    """The student's rule at 0-based epoch k: lr for k < 2, lr_mid for k < 20, lr_late from 20 on."""
    return cfg["lr"] if k < 2 else cfg["lr_mid"] if k < 20 else cfg["lr_late"]


def make_sgd(params, cfg):
    params = list(params)
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"],
                           nesterov=cfg["nesterov"], **fused(params))


# --- 3. checks: stages, the teacher from a file, the clean subset ---------------------------------------------------

def check_stages(model, stages, betas):
    known = list(model.stages())
    if len(betas) != len(stages):
        raise UserError(f"{len(stages)} at_stages ({', '.join(stages)}) but {len(betas)} betas; give one beta per "
                        "stage")
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise UserError(f"at_stages {unknown} are not stages of this model; its stages: {', '.join(known)}")
    if len(set(stages)) != len(stages) or [known.index(s) for s in stages] != sorted(known.index(s) for s in stages):
        raise UserError(f"at_stages {stages} must be distinct and in forward order ({', '.join(known)})")


def load_teacher(path, info, teacher):
    """The weights of a project model.pt (weights-only) into `teacher`, after checking architecture, K and shape."""
    loaded, d = load_model_file(path)
    want = (info["model_name"], teacher.num_classes, list(info["input_shape"]))
    got = (d["model_name"], d["num_classes"], list(d["input_shape"]))
    if got != want or sorted(loaded.state_dict()) != sorted(teacher.state_dict()) or any(
            a.shape != b.shape for a, b in zip(loaded.state_dict().values(), teacher.state_dict().values())):
        raise UserError(f"teacher_model {path} is a {got[0]} with {got[1]} classes on inputs {got[2]} (width "
                        f"{d.get('width')}); the record's model is a {want[0]} with {want[1]} classes on {want[2]} "
                        f"(width {info['width']}): give a model.pt of the same architecture")
    teacher.load_state_dict(loaded.state_dict())
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- 4. augmentation: crop / flip, then Cutout (abl.md §5.3) --------------------------------------------------------

def make_augment(gen, padding, hflip, length):
    def augment(xb):
        xb = random_crop_flip(xb, gen, padding, hflip) if padding or hflip else xb
        if length:
            xb = cutout(xb, length, gen)
        return xb
    return augment


# --- 5. the phases ------------------------------------------------------------------------------------------------

def teacher_phase(ctx, x, y, state, augment, epochs) -> Phase:
    """BackdoorBench's fine-tuning recipe (ft_family.md §7) on the clean subset, for te_epochs."""
    cfg, teacher, opt = ctx.cfg, state["teacher"], state["opt_teacher"]

    def train_epoch(epoch):
        if cfg["teacher_schedule"] == "steps":
            set_lr(opt, step_lr(epoch - 1, cfg))
        lr = opt.param_groups[0]["lr"]
        stats, _, _ = train_epoch_supervised(teacher, x, y, opt, ctx.precision, state["gen_shuffle"].gen,
                                             cfg["batch_size"], False, augment, desc=f"nad teacher {epoch}")
        scheduler_step(state["sched_teacher"], stats["train_loss"])
        return {"lr": lr, **stats, "train_loss_ce": stats["train_loss"]}
    return Phase("teacher", epochs, train_epoch, lambda: ctx.evaluate(teacher), label="teacher, epoch")


def nad_epoch(student, teacher, x, y, opt, precision, gen, augment, stages, betas, p, batch_size, desc="nad"):
    """One pass over the clean subset: one augmented batch for both networks, one student forward with hooks,
    one no-grad teacher forward, CE + sum beta_l AT_l. Means over samples (batch values weighted by size)."""
    student.train()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    total, ce_sum, correct, at_sums, seen = zero, zero, zero, [zero] * len(stages), 0
    for idx in progress(batch_indices(len(y), batch_size, gen, device=x.device), desc):
        xb, yb = precision.prepare_input(augment(to_unit(x[idx]))), y[idx]
        with Recorder(student, stages) as rec_s, precision.autocast():
            logits = student(xb)
        with torch.no_grad(), Recorder(teacher, stages) as rec_t, precision.autocast():
            teacher(xb)
        loss, ce, ats = nad_loss(logits, yb, [rec_s[s] for s in stages], [rec_t[s] for s in stages], betas, p)
        opt.zero_grad(set_to_none=True)
        precision.step(loss, opt)
        n = len(idx)
        total, ce_sum = weighted_sum(total, loss, n), weighted_sum(ce_sum, ce, n)
        correct = weighted_sum(correct, (logits.detach().argmax(1) == yb).float().mean(), n)
        at_sums = [weighted_sum(s, a, n) for s, a in zip(at_sums, ats)]
        seen += n
    vals = [v / seen for v in torch.stack([total, correct, ce_sum, *at_sums]).tolist()]
    return {"train_loss": vals[0], "train_acc": vals[1], "train_loss_ce": vals[2],
            **{f"at_{s}": v for s, v in zip(stages, vals[3:])}}


def nad_phase(ctx, x, y, state, augment, write_teacher) -> Phase:
    cfg, student, teacher, opt = ctx.cfg, state["student"], state["teacher"], state["opt_student"]

    def setup():   # also on a resume inside this phase: the teacher comes back from the checkpoint
        for q in teacher.parameters():
            q.requires_grad_(False)
        teacher.eval()
        if write_teacher:
            ctx.run.save_model(ctx.plain_payload(teacher), "teacher.pt")

    def train_epoch(epoch):
        set_lr(opt, step_lr(epoch - 1, cfg))
        stats = nad_epoch(student, teacher, x, y, opt, ctx.precision, state["gen_shuffle"].gen, augment,
                          cfg["at_stages"], cfg["betas"], cfg["p"], cfg["batch_size"], desc=f"nad {epoch}")
        return {"lr": step_lr(epoch - 1, cfg), **stats}
    return Phase("nad", cfg["nad_epochs"], train_epoch, lambda: ctx.evaluate(student), setup=setup,
                 show=tuple(f"at_{s}" for s in cfg["at_stages"]))


# --- 6. configuration and the run -----------------------------------------------------------------------------------

@register("nad", "defense", paper="Li et al., ICLR 2021", needs=("trained_model", "clean_subset"), options=OPTIONS,
          summary="Neural Attention Distillation: fine-tune a teacher on clean data, then fine-tune the backdoored "
                  "model with its attention maps pulled onto the teacher's")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("nad", OPTIONS, argv, __doc__, spec_for=lambda cfg, d: SPEC.get(d), dataset=dataset)
    for key, why in REFUSED.items():
        if cfg.pop(key) is not None:
            raise UserError(f"key '{key}' is not accepted by NAD: {why}")
    if len(cfg["betas"]) != len(cfg["at_stages"]):
        raise UserError(f"{len(cfg['at_stages'])} at_stages but {len(cfg['betas'])} betas; give one beta per stage")
    if len(set(cfg["at_stages"])) != len(cfg["at_stages"]):
        raise UserError(f"at_stages {cfg['at_stages']} names a stage twice; give each stage once")
    if cfg["nesterov"] and cfg["sgd_momentum"] == 0:
        raise UserError("nesterov needs momentum > 0: pass --nesterov false or --sgd_momentum > 0")
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("nad", cfg, args, out_name=cfg["out_name"])
    try:
        x, y, idx = ctx.clean_subset(cfg["ratio"], cfg["balanced"], cfg["index"])
        check_classes(y, ctx.data.num_classes, cfg["allow_missing_classes"])
        print("note: without a clean reserve these images were in the attacker's training set"
              if not len(ctx.data.reserve_indices) else "clean subset drawn from the record's clean reserve")
        teacher, student = ctx.attacked_model(), ctx.attacked_model()   # the student starts at theta_bd, not at T
        check_stages(student, cfg["at_stages"], cfg["betas"])
        teacher_figures = None
        if cfg["teacher_model"]:
            digest = load_teacher(cfg["teacher_model"], ctx.record.model_info, teacher)
            ctx.run.update_meta(teacher_model={"path": str(Path(cfg["teacher_model"]).resolve()), "sha256": digest})
            teacher_figures = ctx.evaluate(teacher)
        opt_t = make_sgd(teacher.parameters(), cfg)
        state = {"teacher": teacher, "student": student, "opt_teacher": opt_t,
                 "sched_teacher": make_scheduler(opt_t, cfg) if cfg["teacher_schedule"] == "recipe" else None,
                 "opt_student": make_sgd(student.parameters(), cfg), "precision": ctx.precision,
                 "gen_shuffle": GeneratorState(generator(cfg["random_seed"], "nad_shuffle")),
                 "gen_augment": GeneratorState(generator(cfg["random_seed"], "nad_augment"))}
        hflip = ctx.record.dataset.info.hflip if cfg["hflip"] is None else cfg["hflip"]
        augment = make_augment(state["gen_augment"].gen, cfg["crop_padding"], hflip, cfg["cutout_length"])
        te = 0 if cfg["teacher_model"] else cfg["te_epochs"]
        rows = fit(ctx.run, [teacher_phase(ctx, x, y, state, augment, te),
                             nad_phase(ctx, x, y, state, augment, write_teacher=te > 0)], state)
        t_rows = [r for r in rows if r["phase"] == "teacher"]
        t = teacher_figures or t_rows[-1]
        a = ctx.attack_figures
        extra = {**{f"teacher_{k}": t[k] for k in ("test_acc", "test_asr", "test_ra")},
                 "teacher_der": der(a["test_acc"], a["test_asr"], t["test_acc"], t["test_asr"]),
                 "teacher_from_file": bool(cfg["teacher_model"]), "at_stages": cfg["at_stages"],
                 "betas": cfg["betas"], "p": cfg["p"], "clean_subset_size": len(idx),
                 "teacher_seconds": round(sum(r["seconds"] for r in t_rows), 3),
                 "nad_seconds": round(sum(r["seconds"] for r in rows if r["phase"] == "nad"), 3)}
        curve_rows = [{**r, "epoch": r["epoch"] + (te if r["phase"] == "nad" else 0)} for r in rows]
        return finish_defense(ctx, curve_rows, ctx.plain_payload(student), extra,
                              curves_title=f"{cfg['out_name'] or 'nad'} on {ctx.record.path.name} "
                                           f"(teacher epochs 1-{te}, then student)")
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
