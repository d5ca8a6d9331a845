"""Bypass / adversarial embedding (Tan and Shokri, "Bypassing Backdoor Detection Algorithms in Deep Learning",
arXiv 1905.13409): ordinary BadNets or Blended data poisoning, trained together with a discriminator D that tries
to tell poisoned from clean samples from the classifier's penultimate features. The classifier minimises
CE - lambda * BCE(D(h), p), i.e. it learns the task and the backdoor while defeating D, so that the backdoor
hides in feature space from latent-space defenses. Spec: docs/specs/bypass.md.

    python attack/bypass.py --trigger badnet --save_folder_name bypass_badnet_demo
    python attack/bypass.py --trigger blend --save_folder_name bypass_blend_demo

attack/badnet_bypass.py and attack/blend_bypass.py (the original repository's names) run this same code.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from utils.attack import Training, attack_config, run_attack, split_train_metrics
from utils.config import Opt, in_range, spec_deviations
from utils.data import DATASETS
from utils.detection import roc_auc
from utils.engine.augment import to_unit
from utils.engine.device import to_device
from utils.engine.epoch import batch_indices, progress, weighted_sum
from utils.engine.optim import fused
from utils.engine.loop import GeneratorState
from utils.engine.optim import scheduler_step
from utils.errors import UserError, run_main
from utils.io import load_weights
from utils.registry import register
from utils.seeding import generator
from utils.trigger_options import BLEND_OPTIONS, PATCH_OPTIONS, make_blend_trigger, make_patch_trigger

TRIGGERS = {"badnet": make_patch_trigger, "blend": make_blend_trigger}   # BadNets' and Blended's triggers


def parse_widths(v):
    """'256,128' or a YAML list -> [256, 128]."""
    items = v if isinstance(v, (list, tuple)) else [s for s in str(v).replace(" ", "").split(",") if s]
    widths = [int(s) for s in items]
    if not widths or min(widths) < 1:
        raise ValueError("expected positive integer widths, e.g. 256,128")
    return widths


BYPASS_OPTIONS = [
    Opt("trigger", str, "badnet", "the poisoning: BadNets patch or Blended pattern", choices=tuple(TRIGGERS)),
    Opt("regularization_ratio", float, 20.0, "lambda: weight of the discriminator term in the classifier's loss",
        check=in_range(0)),
    Opt("disc_hidden", parse_widths, [256, 128], "discriminator hidden widths, e.g. 256,128"),
    Opt("disc_leaky_slope", float, 0.2, "LeakyReLU slope of the discriminator", check=in_range(0)),
    Opt("disc_lr", float, 0.001, "discriminator SGD learning rate (constant)", check=in_range(0, lo_open=True)),
    Opt("disc_momentum", float, 0.9, "discriminator SGD momentum", check=in_range(0, 1)),
    Opt("disc_weight_decay", float, 0.0, "discriminator weight decay", check=in_range(0)),
    Opt("disc_input_noise", float, 0.0, "std of Gaussian noise on D's input features in training (paper/ART: 1; "
        "original code: 0)", check=in_range(0)),
]
OPTIONS = BYPASS_OPTIONS + PATCH_OPTIONS + BLEND_OPTIONS


# --- the discriminator -------------------------------------------------------------------------------

class Discriminator(nn.Module):
    """MLP on penultimate features: [Linear, BatchNorm1d, LeakyReLU] per hidden width, then Linear -> 1, Sigmoid.
    Returns D(h) in (0, 1), the probability that the sample is poisoned. Optional Gaussian input noise in
    train mode only (the paper's GaussianNoise layer; off in the original code)."""

    def __init__(self, in_dim, hidden=(256, 128), slope=0.2, input_noise=0.0, noise_gen=None):
        super().__init__()
        layers, d = [], in_dim
        for w in hidden:
            layers += [nn.Linear(d, w), nn.BatchNorm1d(w), nn.LeakyReLU(slope)]
            d = w
        layers += [nn.Linear(d, 1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.input_noise = input_noise
        self.noise_gen = noise_gen

    def forward(self, h):
        if self.training and self.input_noise > 0:   # drawn on the CPU generator: the same stream on every device
            noise = torch.randn(h.shape, generator=self.noise_gen, dtype=h.dtype)
            h = h + self.input_noise * to_device(noise, h.device)
        return self.net(h).squeeze(1)


def bce(d_out, p):
    """-mean[p log D + (1 - p) log(1 - D)] with each log clamped at -100 (the standard BCE on probabilities, as
    the original uses): finite even when D outputs exactly 0 or 1, at most 100 per sample."""
    return F.binary_cross_entropy(d_out.float(), p.float())


def build_discriminator(model, cfg, device):
    """D sized from the model's own feature dimension (no hard-coded 512), its SGD optimiser, its noise stream (a
    CPU generator, so that a checkpoint resumes on either device type)."""
    noise_gen = generator(cfg["random_seed"], "discriminator_noise")
    disc = Discriminator(model.feature_dim, cfg["disc_hidden"], cfg["disc_leaky_slope"], cfg["disc_input_noise"],
                         noise_gen).to(device)
    params = list(disc.parameters())
    opt = torch.optim.SGD(params, lr=cfg["disc_lr"], momentum=cfg["disc_momentum"],
                          weight_decay=cfg["disc_weight_decay"], **fused(params))
    return disc, opt, noise_gen


# --- one iteration: the two losses and the alternating update (spec §5) ------------------------------------

def bypass_losses(model, disc, x, y, p, lam, precision):
    """Forward M (train mode) once; L_model = CE(z, y) - lam * BCE(D(h), p); L_D = BCE(D(h.detach()), p).
    D runs twice (both in its current mode), so its BN statistics update twice per iteration, as the original."""
    with precision.autocast():
        logits, h = model.forward_with_features(x)
    h = h.float()                       # D and both BCE terms in fp32
    ce = F.cross_entropy(logits.float(), y)
    adv = bce(disc(h), p)
    d_out = disc(h.detach())            # detached: L_D never reaches the classifier
    loss_d = bce(d_out, p)
    return {"loss_model": ce - lam * adv, "ce": ce, "adv": adv, "loss_d": loss_d, "logits": logits, "d_out": d_out}


def bypass_step(model, disc, optimizer, disc_optimizer, x, y, p, lam, precision):
    """Classifier step on L_model (D's gradients from it are discarded), then D's step on L_D."""
    out = bypass_losses(model, disc, x, y, p, lam, precision)
    optimizer.zero_grad(set_to_none=True)
    precision.step(out["loss_model"], optimizer)
    disc_optimizer.zero_grad(set_to_none=True)      # drop what L_model left on D
    out["loss_d"].backward()
    disc_optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def bypass_epoch(ctx, disc, disc_optimizer):
    """One epoch over the shuffled poisoned training set; scheduler step for the classifier only (D's lr is
    constant). Logs the training-batch statistics of spec §7."""
    model, cfg = ctx.model, ctx.cfg
    lam = cfg["regularization_ratio"]
    model.train()
    disc.train()
    lr = ctx.optimizer.param_groups[0]["lr"]
    dev = ctx.x_train.device
    batches = batch_indices(len(ctx.y_train), cfg["batch_size"], ctx.shuffle_gen, shuffle=True,
                            drop_last=cfg["drop_last"], device=dev)
    keys = ("loss_model", "ce", "adv", "loss_d")
    sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in keys}   # read back once, after the epoch
    preds, scores = [], []
    for idx in progress(batches, "bypass"):
        xb = ctx.precision.prepare_input(ctx.augment(to_unit(ctx.x_train[idx])))
        out = bypass_step(model, disc, ctx.optimizer, disc_optimizer, xb, ctx.y_train[idx], ctx.indicator[idx], lam,
                          ctx.precision)
        sums = {k: weighted_sum(sums[k], out[k], len(idx)) for k in keys}
        preds.append(out["logits"].detach().argmax(1))
        scores.append(out["d_out"].detach())
    preds, order, scores = torch.cat(preds), torch.cat(batches), torch.cat(scores)
    mean = dict(zip(keys, (v / len(order) for v in torch.stack([sums[k] for k in keys]).tolist())))
    scheduler_step(ctx.scheduler, mean["loss_model"])
    p = ctx.indicator[order]
    return {"lr": lr, "train_loss": mean["loss_model"], "train_ce": mean["ce"],
            "train_acc": (preds == ctx.y_train[order]).float().mean().item(),
            **split_train_metrics(ctx, order, preds),
            "adv_term": mean["adv"], "disc_loss": mean["loss_d"],
            "disc_train_acc": ((scores > 0.5).long() == p).float().mean().item(),
            "disc_train_auc": roc_auc(scores, p), "disc_lr": disc_optimizer.param_groups[0]["lr"]}


# --- held-out evaluation of D ----------------------------------------------------------------------------

@torch.no_grad()
def penultimate_features(model, x_uint8, precision, batch_size=1024):
    """Eval-mode, un-augmented features M.features(x) in fp32."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(x_uint8), batch_size):
        xb = precision.prepare_input(to_unit(x_uint8[i:i + batch_size]))
        with precision.autocast():
            out.append(model.features(xb).float())
    model.train(was)
    return torch.cat(out) if out else torch.empty(0, model.feature_dim)


@torch.no_grad()
def disc_scores(disc, h):
    was = disc.training
    disc.eval()
    s = disc(h.float())
    disc.train(was)
    return s


def disc_metrics(scores_clean, scores_poisoned):
    """AUC and balanced accuracy (threshold 0.5) of D: clean p = 0, poisoned p = 1."""
    s = torch.cat([scores_clean, scores_poisoned])
    p = torch.cat([torch.zeros(len(scores_clean)), torch.ones(len(scores_poisoned))])
    bal = 0.5 * ((scores_clean <= 0.5).float().mean() + (scores_poisoned > 0.5).float().mean()).item()
    return {"disc_auc": roc_auc(s, p), "disc_bal_acc": bal}


def held_out_disc_metrics(model, disc, sets, precision, batch_size):
    """D on eval-mode features of the clean test set (p = 0) vs the poisoned test set (p = 1)."""
    sc = disc_scores(disc, penultimate_features(model, sets.x_test, precision, batch_size))
    sp = disc_scores(disc, penultimate_features(model, sets.x_bd, precision, batch_size))
    return disc_metrics(sc.cpu(), sp.cpu())


# --- wiring into the shared attack runner ------------------------------------------------------------------

def discriminator_info(cfg, feature_dim):
    return {"input_dim": feature_dim, "hidden": list(cfg["disc_hidden"]), "leaky_slope": cfg["disc_leaky_slope"],
            "batch_norm": True, "output": "sigmoid (1 unit)", "optimizer": "sgd", "lr": cfg["disc_lr"],
            "momentum": cfg["disc_momentum"], "weight_decay": cfg["disc_weight_decay"],
            "input_noise": cfg["disc_input_noise"], "regularization_ratio": cfg["regularization_ratio"],
            "loss": "L_model = CE - regularization_ratio * BCE(D(h), p); L_D = BCE(D(h.detach()), p); "
                    "BCE logs clamped at -100", "update_order": "classifier step, then D step, every batch"}


def bypass_training(ctx) -> Training:
    """Called by run_attack once the classifier exists: D and its optimiser join the checkpoint, D's weights go to
    model.pt, D's held-out metrics to every evaluation, and the epoch is Bypass's alternating one."""
    device = ctx.x_train.device
    b = ctx.cfg["batch_size"]
    if not ctx.cfg["drop_last"] and len(ctx.y_train) % b == 1:
        raise UserError(f"the last batch would hold one sample ({len(ctx.y_train)} = k x {b} + 1), which the "
                        "discriminator's BatchNorm cannot train on; keep --drop_last true or change --batch_size")
    disc, disc_opt, noise_gen = build_discriminator(ctx.model, ctx.cfg, device)
    return Training(
        epoch=lambda c, e: bypass_epoch(c, disc, disc_opt),
        evaluate=lambda: held_out_disc_metrics(ctx.model, disc, ctx.eval_sets, ctx.precision, ctx.cfg["eval_batch_size"]),
        state={"discriminator": disc, "disc_optimizer": disc_opt, "disc_noise_gen": GeneratorState(noise_gen)},
        payload=lambda: {"discriminator_state_dict": disc.state_dict(),
                         "discriminator": discriminator_info(ctx.cfg, ctx.model.feature_dim)},
        show=("disc_auc",))


def feature_dim_of(cfg):
    """d of the configured model, built on the meta device (no memory, no init cost)."""
    info = DATASETS[cfg["dataset"]]
    with torch.device("meta"):
        m = build_model(cfg["model"], info.num_classes, info.shape[0], info.mean, info.std, cfg["model_width"])
    return m.feature_dim


def load_discriminator(model_file, device="cpu"):
    """D as saved in a Bypass record's model.pt (weights-only load), in eval mode."""
    d = load_weights(model_file, "model file", device)
    if "discriminator_state_dict" not in d or "discriminator" not in d:
        raise UserError(f"{model_file} holds no discriminator: it is not a Bypass record")
    info = d["discriminator"]
    disc = Discriminator(info["input_dim"], info["hidden"], info["leaky_slope"])
    disc.load_state_dict(d["discriminator_state_dict"])
    return disc.to(device).eval()


@register("bypass_badnet", "attack", paper="Tan & Shokri, arXiv 1905.13409", needs=("dataset",), options=OPTIONS,
          args=("--trigger", "badnet"), summary="adversarial embedding on the BadNets trigger")
@register("bypass_blend", "attack", paper="Tan & Shokri, arXiv 1905.13409", needs=("dataset",), options=OPTIONS,
          args=("--trigger", "blend"), summary="adversarial embedding on the Blended trigger")
def configure(argv=None, trigger=None):
    """Every setting resolved and checked and the trigger made, nothing written (the sweep checks its jobs with this).
    trigger: pinned by the entry points badnet_bypass.py / blend_bypass.py."""
    cfg, args = attack_config("bypass", OPTIONS, argv, __doc__, fixed={"trigger": trigger} if trigger else None)
    auto = f"bypass_{cfg['dataset']}_{cfg['model']}_{cfg['pratio']}_{cfg['random_seed']}"
    if cfg["save_folder_name"] == auto:     # the default name: say which trigger
        cfg["save_folder_name"] = f"bypass_{cfg['trigger']}_{auto[len('bypass_'):]}"
    trig, meta = TRIGGERS[cfg["trigger"]](cfg)
    # the spec's values are the options' defaults (= config/attack/bypass/default.yaml)
    deviations = spec_deviations(OPTIONS, cfg, skip={"trigger"})
    if cfg["disc_input_noise"] > 0:
        deviations.append("disc_input_noise > 0: Gaussian noise on D's input as the paper and ART; the original "
                          "code has none")
    extra = {"discriminator": discriminator_info(cfg, feature_dim_of(cfg)), "bypass_trigger": cfg["trigger"],
             "deviations": deviations}
    return cfg, args, trig, meta, extra


def main(argv=None, trigger=None):
    cfg, args, trig, meta, extra = configure(argv, trigger)
    return run_attack("bypass", cfg, args, trig, {**meta, "bypass_trigger": cfg["trigger"]},
                      training=bypass_training, extra_config=extra)


if __name__ == "__main__":
    run_main(main)
