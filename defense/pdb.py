"""PDB, Proactive Defensive Backdoor (Wei, Zha, Wu, "Mitigating Backdoor Attack by Injecting Proactive Defensive
Backdoor", NeurIPS 2024, arXiv 2405.16112; specification: docs/specs/pdb.md).

A training-time defense. The defender trains a new model from scratch on the (possibly poisoned) training set
and injects its own backdoor: a defensive trigger of value 2.0, outside [0, 1] so that no valid image carries
it, makes the model answer h(y) = (y + k) mod K. At inference every input is stamped with that trigger and the
output is mapped back with h^-1; the defensive trigger dominates the attacker's, whose backdoor stays silent,
while clean accuracy survives because h is invertible. The result is a DefendedModel (defense/pdb_model.py):
the raw network is never the deployed model.

    python defense/pdb.py --result_file badnet_demo
"""
import math


import torch
import torch.nn.functional as F

from models import MODELS, build_model
from utils.config import Opt, in_range
from utils.data import dataset_info
from defense.pdb_model import DefendedModel, check_shift, defensive_mask
from utils.defense import defense_config, finish_defense, open_defense
from utils.errors import UserError, run_main
from utils.metrics import accuracy
from utils.poison import class_balanced_draw
from utils.seeding import generator
from utils.engine.augment import random_crop_flip, random_rotation, to_unit, uniform
from utils.engine.device import to_device
from utils.engine.epoch import batch_indices, progress
from utils.engine.evaluate import BREAKDOWN, predict
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import make_optimizer, make_scheduler, scheduler_step
from utils.options import recipe_options
from utils.registry import register


def parse_range(v):
    vals = v if isinstance(v, (list, tuple)) else str(v).strip("[]() ").split(",")
    if len(vals) != 2:
        raise ValueError("expected two numbers lo,hi")
    lo, hi = float(vals[0]), float(vals[1])
    if not 0 < lo <= hi < math.inf:
        raise ValueError("expected finite numbers 0 < lo <= hi")
    return [lo, hi]


prob = in_range(0, 1)
OPTIONS = [
    # the recipe: a new model trained from scratch (pdb.md §3, §8)
    Opt("model", str, "preactresnet18", "architecture trained from scratch", choices=tuple(MODELS)),
    Opt("model_width", int, None, "base width (default: the attack's when the architecture is the same)", check=in_range(1)),
    *recipe_options(epochs=100, batch_size=256, drop_last=None),   # shuffled, the last batch always dropped
    # the defensive data (§2)
    Opt("ratio", float, 0.1, "size of D_cl as a fraction of the training set, class-stratified",
        check=in_range(0, 1, lo_open=True)),
    Opt("defensive_source", str, "clean_original", "images and labels of the defensive samples when the attack has no "
        "reserve: the clean originals (the original code, an oracle) or the poisoned set (realistic)",
        choices=("clean_original", "poisoned")),
    Opt("sample_frequency", int, 5, "copies of the defensive set per epoch: the weight of the defensive loss",
        check=in_range(1)),
    # the defensive trigger and mapping (§4, §5)
    Opt("pix_value", float, 2.0, "defensive trigger value in pixel units (outside [0, 1] on purpose)",
        check=lambda v: None if math.isfinite(v) else "allowed: a finite number"),
    Opt("trigger_type", int, 1, "mask: 0 border frame, 1 top-left square, 2 dotted border", choices=(0, 1, 2)),
    Opt("square_size", int, 7, "side of the type-1 square", check=in_range(1)),
    Opt("border_width", int, 1, "width of the type-0 frame", check=in_range(1)),
    Opt("target_type", int, 1, "the shift k of h(y) = (y + k) mod K; not a multiple of K"),
    # augmentation of defensive samples (§7), then crop and flip for every sample
    Opt("scale_prob", float, 0.2, "probability of the brightness scaling of a defensive sample", check=prob),
    Opt("scale_range", parse_range, [0.5, 1.0], "range of that scaling factor, lo,hi"),
    Opt("noise_prob", float, 0.5, "probability of the Gaussian noise of a defensive sample", check=prob),
    Opt("aug", float, 0.0, "std of that noise (0: no noise)", check=in_range(0)),
    Opt("rotate_prob", float, 0.5, "probability of the rotation of a defensive sample", check=prob),
    Opt("rotate_degrees", float, 10.0, "rotation angle drawn in [-d, d] degrees", check=in_range(0)),
    Opt("crop_padding", int, 4, "random-crop padding of every training sample (0: no crop)", check=in_range(0)),
    Opt("flip_prob", float, 0.5, "horizontal-flip probability of every training sample", check=prob),
    # keys of the original that are refused with a pointer (yaml only)
    *(Opt(k, lambda v: v, None, "", cli=False) for k in ("lmd_1", "lmd_2", "lmd_3", "index")),
]
REFUSED = {
    "lmd_1": "the original's lmd_* are not loss weights; the defensive weight is sample_frequency and the noise "
             "probability is noise_prob",
    "index": "PDB draws its defensive set itself (ratio, defensive_source); an index file is not used",
}
REFUSED["lmd_2"] = REFUSED["lmd_3"] = REFUSED["lmd_1"]


def check_settings(cfg, dataset):
    """Refused keys, and the settings that depend on the dataset (K, image size): checked before any file is written."""
    for key, why in REFUSED.items():
        if cfg.pop(key) is not None:
            raise UserError(f"key '{key}' is not accepted by PDB: {why}")
    info = dataset_info(dataset)
    check_shift(cfg["target_type"], info.num_classes)
    defensive_mask(info.shape, cfg["trigger_type"], cfg["square_size"], cfg["border_width"])
    if 0 <= cfg["pix_value"] <= 1:
        print(f"warning: pix_value {cfg['pix_value']} lies in [0, 1]: an attacker can reproduce the defensive trigger")


# --- 1. the defensive set D_def = {(stamp(x), h(y)) : (x, y) in D_cl} (pdb.md §2, §6) -------------------------

def select_defensive(data, ratio, source, seed):
    """Training indices of D_cl and where its images and labels come from: 'reserve', 'clean_original' or 'poisoned'.
    Without a reserve, class quotas n_c = floor(N * ratio / K) are filled by *poisoned-set* label, as the original."""
    n, k = len(data.y_train), data.num_classes
    n_c = math.floor(n * ratio / k)
    if n_c == 0:
        raise UserError(f"ratio {ratio} of {n} training samples gives 0 defensive samples per class; raise the ratio")
    g = generator(seed, "pdb_defensive_set")
    if len(data.reserve_indices):
        idx = class_balanced_draw(data.reserve_indices, data.y_train_true, n_c, k, g, what="PDB defensive set")
        return idx, "reserve"
    idx = class_balanced_draw(data.train_indices, data.y_train, n_c, k, g, what="PDB defensive set",
                              hint="lower --ratio")
    return idx, source


def defensive_samples(data, idx, source, defended: DefendedModel):
    """Stamped float images (they hold pix_value, so never uint8) and shifted labels h(y), built once."""
    if source == "poisoned":
        x, y = data.x_train[idx], data.y_train[idx]
    else:   # clean originals with true labels: reserve samples are clean, and 'clean_original' is the oracle
        x, y = data.x_train_clean[idx], data.y_train_true[idx]
    x = defended.stamp(to_unit(x).to(defended.mask.device))
    return x, (y + defended.target_type) % data.num_classes


def epoch_batches(n_ordinary, n_defensive, frequency, batch_size, gen):
    """The epoch: all of D_tr followed by D_def repeated `frequency` times, shuffled, drop_last. Positions below
    n_ordinary are ordinary samples; position p above is defensive sample (p - n_ordinary) mod n_defensive."""
    return batch_indices(n_ordinary + frequency * n_defensive, batch_size, gen, shuffle=True, drop_last=True)


# --- 2. augmentation, batched, in pixel space, never clamped (§7) ---------------------------------------------

def crop_flip(x, gen, cfg):
    """RandomCrop(padding, zero fill) and RandomHorizontalFlip(flip_prob), for every training sample."""
    x = random_crop_flip(x, gen, cfg["crop_padding"], flip=False)
    if cfg["flip_prob"] > 0:
        flip = uniform(gen, len(x), x.device) < cfg["flip_prob"]
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def augment_defensive(x, gen, cfg):
    """Scale (trigger included), noise, rotation, then crop and flip: pdb.md §7, in that order."""
    b, dev = len(x), x.device
    scaled = uniform(gen, b, dev) < cfg["scale_prob"]
    lo, hi = cfg["scale_range"]
    s = lo + (hi - lo) * uniform(gen, b, dev)
    x = x * torch.where(scaled, s, torch.ones_like(s))[:, None, None, None]   # x * 1.0 is exact
    noisy = uniform(gen, b, dev) < cfg["noise_prob"]
    if cfg["aug"] > 0:   # at aug = 0 the step is a no-op, as in the original
        noise = to_device(torch.randn(x.shape, generator=gen, device=gen.device), dev) * cfg["aug"]
        x = x + noise * noisy[:, None, None, None]
    x = random_rotation(x, gen, cfg["rotate_prob"], cfg["rotate_degrees"])
    return crop_flip(x, gen, cfg)


# --- 3. training from scratch on D_tr + D_def (§8) --------------------------------------------------------------

class Stream:
    """The epoch's two sources on the device: ordinary samples (uint8, attack labels, poison indicator 0/1) and
    the stored defensive samples (float, h(y), indicator 2)."""

    def __init__(self, data, x_def, y_def, device):
        self.x_ord, self.y_ord = data.x_train.to(device), data.y_train.to(device)
        self.x_def, self.y_def = x_def.to(device), y_def.to(device)
        self.n_ord, self.n_def = len(self.y_ord), len(self.y_def)


def train_epoch(model, stream: Stream, optimizer, scheduler, precision, shuffle_gen, aug_gen, cfg):
    """One epoch of mean cross-entropy over the shuffled stream; labels are h(y) for defensive samples and the
    attack's labels otherwise. Losses and accuracies are also kept per kind (ordinary first in each batch)."""
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    dev = stream.x_ord.device
    sums = torch.zeros(2, 3, dtype=torch.float64, device=dev)   # [ordinary, defensive] x [loss, correct, count]
    for pos in progress(epoch_batches(stream.n_ord, stream.n_def, cfg["sample_frequency"], cfg["batch_size"],
                                      shuffle_gen), "pdb"):
        is_def = pos >= stream.n_ord      # split on the CPU, where the shuffle is drawn: no device read-back
        io, idf = to_device(pos[~is_def], dev), to_device((pos[is_def] - stream.n_ord) % stream.n_def, dev)
        x = torch.cat([crop_flip(to_unit(stream.x_ord[io]), aug_gen, cfg), augment_defensive(stream.x_def[idf], aug_gen, cfg)])
        y = torch.cat([stream.y_ord[io], stream.y_def[idf]])
        with precision.autocast():
            logits = model(precision.prepare_input(x))
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        loss = losses.mean()   # no per-sample weights: the defensive weight is the repetition alone
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss, optimizer)
        with torch.no_grad():
            hit = (logits.argmax(1) == y).double()
            for row, part in enumerate((slice(0, len(io)), slice(len(io), None))):
                sums[row] += torch.stack([losses[part].double().sum(), hit[part].sum(), hit.new_tensor(len(hit[part]))])
    (lo, co, no), (ld, cd, nd) = sums.tolist()
    mean = lambda a, n: a / n if n else float("nan")
    train_loss = mean(lo + ld, no + nd)
    scheduler_step(scheduler, train_loss)
    return {"lr": lr, "train_loss": train_loss, "train_loss_ordinary": mean(lo, no), "train_loss_defensive": mean(ld, nd),
            "train_acc_ordinary": mean(co, no), "train_acc_defensive": mean(cd, nd)}


# --- 4. evaluation: the defended model (headline) and the raw model on plain inputs (§9) -----------------------

RAW = ("raw_test_acc", "raw_test_asr", "raw_test_ra", "premap_test_asr")

def evaluate(ctx, defended: DefendedModel):
    """The defended model (headline, with where its poisoned predictions go), the raw model on plain inputs, and
    the raw model's prediction on stamped poisoned inputs before the inverse mapping: premap_test_asr is how often
    the malicious backdoor still decides there. The mapping then sends those images to h^-1(target), e.g. class 9
    for target 0 and shift 1: redirected, not removed (the defended model's test_top_wrong_class shows them)."""
    d = ctx.evaluate(defended)
    r = ctx.evaluate(defended.inner, prefix="raw_")
    sets = ctx.eval_sets
    pre, _ = predict(defended.inner, sets.x_bd, ctx.precision, ctx.cfg["eval_batch_size"], transform=defended.stamp)
    return {"test_acc": d["test_acc"], "test_asr": d["test_asr"], "test_ra": d["test_ra"],
            **{k: d[k] for k in BREAKDOWN},
            "raw_test_acc": r["raw_test_acc"], "raw_test_asr": r["raw_test_asr"], "raw_test_ra": r["raw_test_ra"],
            "premap_test_asr": accuracy(pre, sets.y_bd),
            "clean_test_loss": d["clean_test_loss"], "bd_test_loss": d["bd_test_loss"]}


@register("pdb", "defense", paper="Wei et al., NeurIPS 2024", needs=("poisoned_train_set",), options=OPTIONS,
          summary="Proactive Defensive Backdoor: train a new model with a defensive backdoor of the defender's own")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("pdb", OPTIONS, argv, __doc__, dataset=dataset,
                               spec_for=lambda cfg, dataset: {"border_width": 5} if dataset == "tiny" else {})
    check_settings(cfg, args.dataset)
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    ctx = open_defense("pdb", cfg, args)
    try:
        data, info, run = ctx.data, ctx.record.model_info, ctx.run
        k = data.num_classes
        name = cfg["model"]
        width = cfg["model_width"] or (info["width"] if name == info["model_name"] else None)
        torch.manual_seed(cfg["random_seed"])   # the initial weights
        inner = ctx.precision.prepare_model(build_model(name, k, info["input_shape"][0], info["mean"], info["std"], width))
        defended = DefendedModel(inner, info["input_shape"], cfg["trigger_type"], cfg["pix_value"], cfg["square_size"],
                                 cfg["border_width"], cfg["target_type"])

        idx, source = select_defensive(data, cfg["ratio"], cfg["defensive_source"], cfg["random_seed"])
        x_def, y_def = defensive_samples(data, idx, source, defended)
        stream = Stream(data, x_def, y_def, ctx.device)
        n_epoch = stream.n_ord + cfg["sample_frequency"] * stream.n_def
        if n_epoch < cfg["batch_size"]:
            raise UserError(f"an epoch holds {n_epoch} samples, fewer than batch_size {cfg['batch_size']}: with drop_last "
                            "no step would be taken; lower --batch_size")
        run.write_file("index.txt", "".join(f"{i}\n" for i in idx.tolist()))
        run.update_meta(defensive_set={"source": source, "size": len(idx), "per_class": len(idx) // k,
                                       "ratio": cfg["ratio"], "seed": cfg["random_seed"], "epoch_size": n_epoch,
                                       "iterations_per_epoch": n_epoch // cfg["batch_size"]},
                        model={"name": name, "width": width})
        print(f"defensive set: {len(idx)} samples ({len(idx) // k} per class) from {source}, labels (y + "
              f"{cfg['target_type']}) mod {k}; epoch of {stream.n_ord} + {cfg['sample_frequency']} x {stream.n_def} = "
              f"{n_epoch} samples, {n_epoch // cfg['batch_size']} iterations; training {name} from scratch")
        if source == "reserve" and cfg["defensive_source"] != "clean_original":
            print("note: the attack record holds a clean reserve: defensive samples come from it, "
                  "defensive_source is ignored")
        p = ctx.record.poison
        if p["attack_label_trans"] == "all2all" and (p["attack_label_shift_amount"] - cfg["target_type"]) % k == 0:
            run.update_meta(same_target_as_attacker=True)
            print("caution: the defensive mapping h equals the attack's all2all mapping (the paper's 'attacker uses the "
                  "defender's target' case)")

        optimizer = make_optimizer(inner.parameters(), cfg)
        scheduler = make_scheduler(optimizer, cfg)
        shuffle_gen, aug_gen = generator(cfg["random_seed"], "shuffle"), generator(cfg["random_seed"], "augmentation")
        state = {"model": inner, "optimizer": optimizer, "scheduler": scheduler, "precision": ctx.precision,
                 "shuffle_gen": GeneratorState(shuffle_gen), "aug_gen": GeneratorState(aug_gen)}
        rows = fit(run, Phase("train", cfg["epochs"],
                              lambda e: train_epoch(inner, stream, optimizer, scheduler, ctx.precision, shuffle_gen,
                                                    aug_gen, cfg),
                              lambda: evaluate(ctx, defended), show=RAW), state)
        return finish_defense(ctx, rows, defended.payload(name, width, info["dataset"]),
                              {"model": name, "defensive_source": source, "n_defensive": len(idx),
                               "same_target_as_attacker": bool(run.meta.get("same_target_as_attacker")),
                               "train_seconds": round(sum(r["seconds"] for r in rows), 2),
                               "attack_train_seconds": ctx.record.summary.get("train_seconds")},
                              curves_title=f"PDB on {ctx.record.path.name} (dashed: raw model)",
                              curves=(("raw_test_acc", "raw ACC"), ("raw_test_asr", "raw ASR")), carry=RAW)
    finally:
        ctx.run.close()


if __name__ == "__main__":
    run_main(main)
