"""The re-tuning attack (Min et al., NeurIPS 2024, "Uncovering, Explaining, and Mitigating the Superficial Safety of
Backdoor Defense"; the FST repository's fine_tune/ft_poison.py): does a purified model relearn its backdoor from a
handful of poisoned samples? A copy of the defense record's model is fine-tuned for a few epochs on a small set of
clean training samples mixed with n_p poisoned ones, and the ASR after it is reported beside the purified one. A
clean model keeps a low ASR under the same re-tuning; a superficially purified one climbs back. Spec:
docs/specs/retune.md.

    python analysis/retune.py --result_file badnet_demo/defense/fst        # a purified model
    python analysis/retune.py --result_file badnet_demo                    # the undefended model
    python analysis/retune.py --result_file badnet_demo --start_model clean_demo   # the clean-model control
    python analysis/retune.py --result_file badnet_demo/defense/fst --qra universal --qra_clean_model clean_demo

Writes <record>/retune<suffix>/ (metrics.csv with the starting model as epoch 0, summary.json, model.pt), or
<record>/retune_control<suffix>/ with --start_model; the records read are not touched. The control re-tunes a model
trained without the backdoor (e.g. `python attack/badnet.py --p_num 1 --save_folder_name clean_demo`) on the same
re-tuning set: the ASR it reaches is what 15 poisoned samples teach from scratch, the floor against which a
defense's recovered ASR means a backdoor that was hidden rather than removed. --qra universal then searches one
L-inf perturbation (16/255) that makes the purified model act as the re-tuned one while the clean model stays
correct: a backdoor reactivated without touching the deployed weights (spec §4.3; qra.json).
"""
import json
import math

import safetensors.torch
import torch
import torch.nn.functional as F

from utils.attack import data_hflip
from utils.config import CONFIG_DIR, Opt, format_config, in_range, layered_config, read_yaml, spec_deviations
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.device import pick_device
from utils.engine.epoch import batch_indices, train_epoch_supervised
from utils.engine.evaluate import EvalSets, breakdown_line, breakdown_summary, evaluate_backdoor, predict
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import fused
from utils.engine.setup import start_engine
from utils.errors import UserError, run_main
from utils.io import read_json
from utils.metrics import accuracy, der
from utils.model_file import load_defense_model, model_payload, read_model_file
from utils.options import device_options
from utils.poison import uniform_draw
from utils.record import check_attack_record, load_attack_record, record_dataset
from utils.record_names import is_complete, record_path
from utils.run_folder import Run
from utils.seeding import fix_random, generator

OPTIONS = [
    Opt("result_file", str, None, "the record to re-tune: a defense record <attack record>/defense/<method>, or an "
        "attack record (its undefended model) (required)"),
    Opt("start_model", str, None, "re-tune this record's model instead (the clean-model control: a record trained "
        "without the backdoor on the same dataset and architecture); the re-tuning set and the test sets are still "
        "result_file's attack's"),
    Opt("dataset_path", str, None, "folder holding the datasets (default: the attack's)"),
    *device_options(),
    Opt("random_seed", int, 0, "seed of the draws, the shuffle and the augmentation (the original: 42)",
        check=in_range(0)),
    Opt("poison_num", int, 5, "n_p: poisoned training samples in the re-tuning set (0: the clean control)",
        check=in_range(0)),
    Opt("split_ratio", float, 0.02, "the whole re-tuning set as a fraction of the training set, poisoned included",
        check=in_range(0, 1, lo_open=True)),
    Opt("epochs", int, 5, "re-tuning epochs", check=in_range(1)),
    Opt("lr", float, 0.01, "SGD learning rate, constant", check=in_range(0, lo_open=True)),
    Opt("momentum", float, 0.9, "SGD momentum", check=in_range(0, 1)),
    Opt("weight_decay", float, 0.0, "SGD weight decay", check=in_range(0)),
    Opt("batch_size", int, 128, "batch size (the last partial batch is kept)", check=in_range(1)),
    Opt("crop_padding", int, 4, "random-crop padding of the clean samples' augmentation (poisoned: none)",
        check=in_range(0)),
    Opt("hflip", bool, None, "random horizontal flip of the clean samples (default: the dataset's rule)"),
    Opt("out_suffix", str, "", "appended to the output folder's name (retune<suffix>)"),
    # spec §4.3: backdoor reactivation without touching the deployed model, after the re-tuning
    Opt("qra", str, "none", "after re-tuning, search one universal L-inf perturbation that makes the purified model "
        "act as the re-tuned one while a clean model stays correct (spec §4.3; 'none': skip)",
        choices=("none", "universal")),
    Opt("qra_clean_model", str, None, "with --qra: the record of a model trained without the backdoor (required)"),
    Opt("qra_eps", float, 16 / 255, "with --qra: L-inf budget of the perturbation, pixel units",
        check=in_range(0, 1, lo_open=True)),
    Opt("qra_alpha", float, 0.2, "with --qra: weight of the KL term (the clean model's CE has weight 1)",
        check=in_range(0)),
    Opt("qra_epochs", int, 50, "with --qra: epochs over its data, one signed step of eps/10 per batch",
        check=in_range(1)),
    Opt("qra_num", int, 500, "with --qra: clean and poisoned training images each (poisoned: not of the target "
        "class)", check=in_range(1)),
]
RUN_KEYS = ({o.name for o in OPTIONS[:3]} | {o.name for o in device_options()}
            | {"random_seed", "out_suffix", "qra_clean_model"})


def target_and_attack(result_file):
    """(the record whose model is re-tuned, its attack record), both checked complete: a defense record and its
    attack, or an attack record twice."""
    path = record_path(result_file)
    if path.parent.name != "defense":
        return check_attack_record(path), path
    if not is_complete(path):
        raise UserError(f"the defense record {path} is missing or incomplete; run the defense first")
    return path, check_attack_record(path.parent.parent)


def start_record(start_model, attack_path):
    """The --start_model record, checked complete and made on the attack's dataset."""
    path = record_path(start_model)
    if not is_complete(path) or not (path / "model.pt").exists():
        raise UserError(f"--start_model {start_model}: no complete record with a model.pt at {path}")
    where = path.parent.parent if path.parent.name == "defense" else path
    if record_dataset(where) != record_dataset(attack_path):
        raise UserError(f"--start_model {path} was made on {record_dataset(where)}, the re-tuning set is "
                        f"{record_dataset(attack_path)}'s: give a record of the same dataset")
    return path


def layers(cli, user):
    result_file = cli.get("result_file") or user.get("result_file")
    if not result_file:
        raise UserError("--result_file is required: the defense record to re-tune, e.g. "
                        "`python analysis/retune.py --result_file badnet_demo/defense/fst`")
    dataset = record_dataset(target_and_attack(result_file)[1])
    files = [CONFIG_DIR / "retune" / name for name in ("default.yaml", f"{dataset}.yaml")]
    return [(str(f.relative_to(CONFIG_DIR.parent)), read_yaml(f)) for f in files if f.exists()]


# spec §2: the project's setting for the 28x28 datasets (the originals have none): the project's 5 % of clean data
# and the original's poisoned share of the set (0.5 %)
SPEC_BY_DATASET = {"fashion_mnist": {"split_ratio": 0.05, "poison_num": 15},
                   "mnist": {"split_ratio": 0.05, "poison_num": 15}}


def configure(argv=None):
    cfg, args = layered_config("analysis/retune.py", OPTIONS, __doc__, argv, layers)
    _, attack_path = target_and_attack(cfg["result_file"])
    if cfg["start_model"]:
        start_record(cfg["start_model"], attack_path)
    if cfg["qra"] != "none":
        if not cfg["qra_clean_model"]:
            raise UserError("--qra needs --qra_clean_model: a record trained without the backdoor, e.g. "
                            "`python attack/badnet.py --p_num 1 --save_folder_name clean_demo`")
        if cfg["start_model"]:
            raise UserError("--qra reactivates the backdoor of the record's own model; it does not combine with "
                            "--start_model (the control)")
        start_record(cfg["qra_clean_model"], attack_path)
    dataset = record_dataset(attack_path)
    args.deviations = spec_deviations(OPTIONS, cfg, SPEC_BY_DATASET.get(dataset), skip=RUN_KEYS)
    return cfg, args


# --- the re-tuning set (spec §3 step 3) ------------------------------------------------------------------------

def retune_set(data, cfg):
    """n = floor(N split_ratio) training samples: n_p drawn from the attack's poisoned training samples (their
    poisoned images and attack labels) and n - n_p from the attacker's unpoisoned ones (clean images, true labels).
    Returns (poisoned indices, clean indices)."""
    n_all = len(data.y_train)
    n = math.floor(n_all * cfg["split_ratio"])
    n_p = cfg["poison_num"]
    if n <= n_p:
        raise UserError(f"the re-tuning set of {n} samples (split_ratio {cfg['split_ratio']} of {n_all}) cannot hold "
                        f"{n_p} poisoned samples and any clean one; raise split_ratio or lower poison_num")
    tr = data.train_indices
    poisoned = tr[data.poison_indicator[tr] == 1]
    if n_p > len(poisoned):
        raise UserError(f"poison_num {n_p} exceeds the {len(poisoned)} poisoned training samples of the attack record")
    p_idx = poisoned[torch.randperm(len(poisoned), generator=generator(cfg["random_seed"], "retune_poison"))[:n_p]]
    c_idx = uniform_draw(tr[data.poison_indicator[tr] == 0], n - n_p, generator(cfg["random_seed"], "retune_clean"),
                         what="re-tuning clean set")
    return p_idx.sort().values, c_idx


def main(argv=None):
    cfg, args = configure(argv)
    target_path, attack_path = target_and_attack(cfg["result_file"])
    start_path = start_record(cfg["start_model"], attack_path) if cfg["start_model"] else target_path
    fix_random(cfg["random_seed"])
    device = pick_device(cfg["device"])
    record = load_attack_record(attack_path, cfg["dataset_path"], device="cpu")
    d = read_model_file(start_path / "model.pt")
    model = load_defense_model(start_path / "model.pt")
    # the control's starting figures are measured here, on this attack's test sets; a record's own are checked
    start_summary = None if cfg["start_model"] else read_json(target_path / "summary.json", "record file")
    folder = ("retune_control" if cfg["start_model"] else "retune") + cfg["out_suffix"]
    run = Run(target_path / folder, "retune", cfg, overwrite=args.overwrite, resume=args.resume,
              deviations=args.deviations, extra={"retuned_record": str(target_path), "attack_record": str(attack_path),
                                                 "start_model": str(start_path)})
    try:
        print(f"retune: resolved configuration\n{format_config(cfg)}")
        info = record.model_info
        precision = start_engine(run, cfg, device, model, f"{d.get('model_name')} width {d.get('width')}",
                                 info["input_shape"], cfg["batch_size"])
        model = precision.prepare_model(model)
        for p in model.parameters():   # every weight: what the defense froze or pruned is the attacker's to move
            p.requires_grad_(True)
        data = record.data
        p_idx, c_idx = retune_set(data, cfg)
        run.write_file("poison_index.txt", "".join(f"{i}\n" for i in p_idx.tolist()))
        run.write_file("index.txt", "".join(f"{i}\n" for i in c_idx.tolist()))
        x = torch.cat([data.x_train[p_idx], data.x_train_clean[c_idx]]).to(device)
        y = torch.cat([data.y_train[p_idx], data.y_train_true[c_idx]]).to(device)
        is_poisoned = torch.cat([torch.ones(len(p_idx)), torch.zeros(len(c_idx))]).bool().to(device)
        run.update_meta(retune_set={"n": len(y), "n_poisoned": len(p_idx), "n_clean": len(c_idx)})
        print(f"re-tuning {start_path} on {len(c_idx)} clean + {len(p_idx)} poisoned training samples, "
              f"{cfg['epochs']} epochs, lr {cfg['lr']}")
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                              **fused(params))
        shuffle_gen, aug_gen = generator(cfg["random_seed"], "retune_shuffle"), generator(cfg["random_seed"], "retune_augment")
        hflip = data_hflip({"dataset": record.config["dataset"], "hflip": cfg["hflip"]})

        def batch(idx):   # the clean samples augmented, the poisoned ones as the attacker made them
            xb = to_unit(x[idx])
            aug = random_crop_flip(xb, aug_gen, cfg["crop_padding"], hflip)
            return torch.where(is_poisoned[idx][:, None, None, None], xb, aug), y[idx]

        def epoch(e):
            lr = opt.param_groups[0]["lr"]
            stats, order, preds = train_epoch_supervised(model, x, y, opt, precision, shuffle_gen, cfg["batch_size"],
                                                         False, None, desc="retune", make_batch=batch)
            hit = preds == y[order]
            bd = is_poisoned[order]
            return {"lr": lr, **stats, "train_asr_bd_only": (hit & bd).sum().item() / max(int(bd.sum()), 1)}

        sets = EvalSets(data, device)
        evaluate = lambda: evaluate_backdoor(model, sets, precision, cfg["eval_batch_size"])   # noqa: E731
        phases = [Phase("start", 1, lambda e: {}, evaluate, start=0),
                  Phase("retune", cfg["epochs"], epoch, evaluate)]
        rows = fit(run, phases, {"model": model, "optimizer": opt, "precision": precision,
                                 "shuffle_gen": GeneratorState(shuffle_gen), "aug_gen": GeneratorState(aug_gen)})
        qra = None
        if cfg["qra"] == "universal":
            qra = reactivation(run, record, cfg, precision, sets, model, start_path, c_idx, device)
        return finish(run, record, d, model, rows, start_summary, retune_name(target_path, attack_path, cfg), qra)
    finally:
        run.close()


# --- reactivation without re-tuning the deployed model: the universal variant (spec §4.3) -----------------------

def qra_loss(logits_pur, logits_ra, logits_clean, y_true, alpha):
    """alpha KL(softmax(f_RA(x)) || softmax(f_pur(x + delta))) (mean over the batch) + CE(f_clean(x + delta), y):
    the purified model on the perturbed image behaves as the re-tuned one on the plain image, while a clean model
    keeps the true label (so delta is no ordinary adversarial perturbation)."""
    kl = F.kl_div(logits_pur.float().log_softmax(1), logits_ra.float().log_softmax(1), log_target=True,
                  reduction="batchmean")
    return alpha * kl + F.cross_entropy(logits_clean.float(), y_true)


def universal_delta(pur, ra, clean, x, y_true, cfg, gen):
    """One perturbation for every image, ||delta||_inf <= eps, images clipped to [0, 1]; a signed step of eps/10
    after each batch of 128, qra_epochs epochs. The three models are frozen, in eval mode."""
    eps = cfg["qra_eps"]
    delta = torch.zeros_like(x[:1])
    with torch.no_grad():
        logits_ra = torch.cat([ra(x[i:i + 1024]) for i in range(0, len(x), 1024)])
    for _ in range(cfg["qra_epochs"]):
        for idx in batch_indices(len(x), 128, gen, device=x.device):
            delta.requires_grad_(True)
            xt = (x[idx] + delta).clamp(0, 1)
            loss = qra_loss(pur(xt), logits_ra[idx], clean(xt), y_true[idx], cfg["qra_alpha"])
            grad, = torch.autograd.grad(loss, delta)
            delta = (delta.detach() - eps / 10 * grad.sign()).clamp_(-eps, eps)
    return delta.detach()


def reactivation_figures(model, sets, delta, target, precision, batch_size):
    """The share of clean test images (not of the target class) + delta predicted as the target, and the ASR of
    the poisoned test images + delta."""
    add = lambda xb: (xb + delta).clamp(0, 1)   # noqa: E731
    pc, _ = predict(model, sets.x_test, precision, batch_size, transform=add)
    keep = sets.y_test != target
    pb, _ = predict(model, sets.x_bd, precision, batch_size, transform=add)
    return {"clean_to_target": accuracy(pc[keep], sets.y_test.new_full((int(keep.sum()),), target)),
            "asr": accuracy(pb, sets.y_bd)}


def reactivation(run, record, cfg, precision, sets, ra_model, start_path, c_idx, device):
    """The universal variant of the query-based reactivation attack (spec §4.2 data and objective, §4.3 delta):
    qra_num clean re-tuning images and qra_num poisoned training images of other classes than the target."""
    if record.poison["attack_label_trans"] != "all2one":
        raise UserError("--qra needs an all2one attack (its figures count the one target label)")
    target, data = int(record.poison["attack_target"]), record.data
    tr = data.train_indices
    pool = tr[(data.poison_indicator[tr] == 1) & (data.y_train_true[tr] != target)]
    n = cfg["qra_num"]
    if n > len(c_idx) or n > len(pool):
        raise UserError(f"qra_num {n} exceeds the {len(c_idx)} clean re-tuning images or the {len(pool)} poisoned "
                        "training images of other classes; lower --qra_num")
    p_idx = pool[torch.randperm(len(pool), generator=generator(cfg["random_seed"], "qra_poison"))[:n]]
    x = to_unit(torch.cat([data.x_train_clean[c_idx[:n]], data.x_train[p_idx]])).to(device)
    y = torch.cat([data.y_train_true[c_idx[:n]], data.y_train_true[p_idx]]).to(device)
    frozen = lambda path: load_defense_model(path / "model.pt", device).eval().requires_grad_(False)   # noqa: E731
    clean_path = record_path(cfg["qra_clean_model"])
    pur, clean = frozen(start_path), frozen(clean_path)
    ra = ra_model.eval().requires_grad_(False)
    print(f"qra (universal): eps {cfg['qra_eps']:.4f}, {cfg['qra_epochs']} epochs on {n} clean + {n} poisoned images")
    delta = universal_delta(pur, ra, clean, x, y, cfg, generator(cfg["random_seed"], "qra_shuffle"))
    plain = torch.zeros_like(delta)
    out = {"mode": "universal", "eps": cfg["qra_eps"], "alpha": cfg["qra_alpha"], "epochs": cfg["qra_epochs"],
           "n_clean": n, "n_poisoned": n, "clean_model": str(clean_path),
           "linf": float(delta.abs().max())}
    for name, m in (("purified", pur), ("clean", clean)):
        for tag, dl in (("", delta), ("_no_delta", plain)):
            for k, v in reactivation_figures(m, sets, dl, target, precision, cfg["eval_batch_size"]).items():
                out[f"{name}_{k}{tag}"] = v
    run.write_file("qra.json", json.dumps(out, indent=2) + "\n")
    run.write_file("qra_delta.safetensors", safetensors.torch.save({"delta": delta.cpu().contiguous()}))
    print(f"qra: purified model ASR {100 * out['purified_asr_no_delta']:.2f} % -> {100 * out['purified_asr']:.2f} % "
          f"with delta, clean images to the target {100 * out['purified_clean_to_target']:.2f} %; clean model ASR "
          f"{100 * out['clean_asr']:.2f} % with delta")
    ra.requires_grad_(True)
    return out


def retune_name(target_path, attack_path, cfg) -> str:
    """The row's name: <defense>+retune, none+retune (the undefended model), control+retune (--start_model)."""
    if cfg["start_model"]:
        return "control+retune"
    return f"{target_path.name}+retune" if target_path != attack_path else "none+retune"


def finish(run, record, d, model, rows, start_summary, name, qra=None):
    first, last = rows[0], rows[-1]
    a = record.summary
    same = start_summary is None or all(abs(first[k] - start_summary[k]) < 1e-9 for k in ("test_acc", "test_asr", "test_ra"))
    if not same:
        print("note: the starting model's figures here differ from the record's summary.json (another "
              f"precision or device?): ACC {first['test_acc']:.4f} / {start_summary['test_acc']:.4f}, ASR "
              f"{first['test_asr']:.4f} / {start_summary['test_asr']:.4f}")
    if hasattr(model, "payload"):   # PDB's defended model: its wrapper file
        payload = model.payload(d["model_name"], d.get("width"), d.get("dataset"))
    else:
        payload = model_payload(model, d["model_name"], d["input_shape"], d.get("width"), d.get("dataset"))
    run.save_model(payload)
    pick = lambda r: {k: r[k] for k in ("test_acc", "test_asr", "test_ra")}   # noqa: E731
    summary = run.finish({
        "defense": name, "evaluation": "retune", "attack": record.poison["attack"],
        "attack_record": str(record.path), "retuned_record": run.meta["retuned_record"],
        "start_model": run.meta["start_model"], "dataset": record.config["dataset"],
        **pick(last), **breakdown_summary(last), "start": pick(first), "retuned": pick(last),
        "asr_gain": last["test_asr"] - first["test_asr"], "acc_change": last["test_acc"] - first["test_acc"],
        "max_test_asr": max(r["test_asr"] for r in rows), "epoch0_matches_record": same,
        "attack_test_acc": a["test_acc"], "attack_test_asr": a["test_asr"], "attack_test_ra": a["test_ra"],
        "der": der(a["test_acc"], a["test_asr"], last["test_acc"], last["test_asr"]),
        "n_poisoned": run.meta["retune_set"]["n_poisoned"], "n_clean": run.meta["retune_set"]["n_clean"],
        **({"qra": qra} if qra else {})})
    print(f"\n{'':14}{'ACC':>8}{'ASR':>8}{'RA':>8}\n"
          f"{'attack':14}{a['test_acc']:8.4f}{a['test_asr']:8.4f}{a['test_ra']:8.4f}\n"
          f"{'start':14}{first['test_acc']:8.4f}{first['test_asr']:8.4f}{first['test_ra']:8.4f}  {breakdown_line(first)}\n"
          f"{'re-tuned':14}{last['test_acc']:8.4f}{last['test_asr']:8.4f}{last['test_ra']:8.4f}  {breakdown_line(last)}\n"
          f"ASR {100 * first['test_asr']:.2f} % -> {100 * last['test_asr']:.2f} % after re-tuning on "
          f"{summary['n_poisoned']} poisoned + {summary['n_clean']} clean samples ({summary['seconds']:.1f}s)\n"
          f"record: {run.path}")
    return summary


if __name__ == "__main__":
    run_main(main)
