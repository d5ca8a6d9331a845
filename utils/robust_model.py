"""The robust-model resource (kind `robust_model`): PGD adversarial training (Madry et al., ICLR 2018) with the
dataset's prototype recipe on the whole clean training split, seeds from resource_seed. LC perturbs its target-class
images against it (docs/specs/lc.md §5.1): perturbations of a robust model change what the image looks like to a
network more than those of a standard one.

Each training batch (x, y), after augmentation, is replaced by its adversarial examples before the optimiser step:

    delta ~ U[-eps, eps], delta <- clip(x + delta, 0, 1) - x                       (random start)
    T times: delta <- clip(delta + alpha sign(grad_delta CE(S(x + delta), y)), -eps, eps); delta <- clip(x + delta, 0, 1) - x
    one step on CE(S(x + delta), y)                                                (adversarial examples only)

The attack passes run in fp32 without autocast, the model in train mode (batch-norm batch statistics, as
locuslab/fast_adversarial), no parameter gradient accumulated; the optimiser step follows the run's precision like
the clean model's. The recipe is clean_model's (utils/clean_model.py): the prototype's, not the attack's command
line; the epochs may differ (the cosine T_max then follows them). The folder is a training run of the toolkit and
resumes from its checkpoint with --resume.
"""
import torch
import torch.nn.functional as F

from utils.clean_model import RECIPE_KEYS, clean_recipe, start_training
from utils.engine.augment import random_crop_flip, to_unit
from utils.engine.device import to_device
from utils.engine.epoch import train_epoch_supervised
from utils.engine.evaluate import eval_mode, predict
from utils.engine.loop import GeneratorState, Phase, fit
from utils.engine.optim import scheduler_step
from utils.model_file import load_model_file, model_payload
from utils.plots import curves_figure
from utils.resources import data_identity, obtain, resource_root
from utils.run_folder import Run
from utils.seeding import generator

ROBUST_EVAL_N = 1000      # test images of the robust accuracy (§5.1)
ROBUST_EVAL_STEPS = 10


def adversarial_examples(model, x, y, eps: float, alpha: float, steps: int, gen=None, prepare=lambda t: t):
    """x + delta after `steps` signed-gradient steps of size alpha within [-eps, eps] (0-1 units) and the image
    range; from a U[-eps, eps] start drawn from gen (a CPU generator), or from 0 without one. fp32, no autocast, the
    model's mode as the caller set it; only the gradient with respect to delta is computed."""
    x = x.float()
    if gen is not None:
        delta = to_device((torch.rand(x.shape, generator=gen) * 2 - 1) * eps, x.device)
        delta = (x + delta).clamp(0, 1) - x
    else:
        delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(prepare(x + delta)).float(), y)
        g, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def robust_accuracy(model, x_uint8, y, eps, alpha, steps, batch_size, prepare=lambda t: t) -> float:
    """Accuracy under PGD from a zero start (eval mode, fp32)."""
    hits = 0
    with eval_mode(model):
        for i in range(0, len(y), batch_size):
            xa = adversarial_examples(model, to_unit(x_uint8[i:i + batch_size]), y[i:i + batch_size], eps, alpha,
                                      steps, prepare=prepare)
            with torch.no_grad():
                hits += int((model(prepare(xa)).argmax(1) == y[i:i + batch_size]).sum())
    return hits / max(len(y), 1)


ADV_KEYS = ("adv_train_eps", "adv_train_alpha", "adv_train_steps", "random_start")


def robust_recipe(cfg, model=None, width=None, epochs=None, eps=8.0, alpha=2.0, steps=10) -> dict:
    """clean_model's settings for `model` (default: the attack's) with the adversarial-training values (0-255
    units) and the surrogate's epochs (default: the recipe's; a cosine T_max follows them)."""
    model = model or cfg["model"]
    rc = clean_recipe({**cfg, "model": model, "model_width": cfg["model_width"] if model == cfg["model"] else width})
    if epochs is not None and epochs != rc["epochs"]:
        rc["epochs"] = epochs
        if rc["lr_scheduler"] == "CosineAnnealingLR":
            rc["cos_t_max"] = epochs
    rc.update(adv_train_eps=float(eps), adv_train_alpha=float(alpha), adv_train_steps=int(steps), random_start=True)
    return rc


def robust_identity(rc: dict, dataset) -> dict:
    return {"kind": "robust_model", **data_identity(dataset), "model": rc["model"], "model_width": rc["model_width"],
            "recipe": {k: rc[k] for k in RECIPE_KEYS}, "params": {k: rc[k] for k in ADV_KEYS}, "seed": rc["random_seed"]}


def train_robust_model(folder, rc: dict, dataset, resume: bool) -> dict:
    """Adversarial training into `folder` (a Run); returns the entries of resource.json."""
    run = Run(folder, "robust_model", rc, resume=resume)
    try:
        info, seed = dataset.info, rc["random_seed"]
        eps, alpha, steps = rc["adv_train_eps"] / 255, rc["adv_train_alpha"] / 255, rc["adv_train_steps"]
        t = start_training(run, rc, dataset)
        model, device, precision, x, y, x_test, y_test, optimizer, scheduler, shuffle_gen, aug_gen, hflip = (
            t.model, t.device, t.precision, t.x, t.y, t.x_test, t.y_test, t.optimizer, t.scheduler, t.shuffle_gen,
            t.aug_gen, t.hflip)
        pgd_gen = generator(seed, "robust_model_pgd")
        print(f"robust model: PGD adversarial training, eps {rc['adv_train_eps']}/255, alpha {rc['adv_train_alpha']}/255,"
              f" {steps} steps, random start; {rc['epochs']} epochs")

        def batch(idx):   # train_epoch_supervised has put the model in train mode
            xb = random_crop_flip(to_unit(x[idx]), aug_gen, rc["crop_padding"], hflip)
            return adversarial_examples(model, xb, y[idx], eps, alpha, steps, pgd_gen, precision.prepare_input), y[idx]

        now = {"epoch": 0}

        def epoch(e):
            now["epoch"] = e
            lr = optimizer.param_groups[0]["lr"]
            stats, _, _ = train_epoch_supervised(model, x, y, optimizer, precision, shuffle_gen, rc["batch_size"],
                                                 rc["drop_last"], None, desc=f"robust model {e}", make_batch=batch)
            scheduler_step(scheduler, stats["train_loss"])
            return {"lr": lr, **stats}

        def evaluate():
            pred, _ = predict(model, x_test, precision, rc["eval_batch_size"])
            out = {"test_acc": (pred == y_test).float().mean().item()}
            if now["epoch"] == rc["epochs"]:   # the last epoch: the accuracy under PGD too
                n = min(ROBUST_EVAL_N, len(y_test))
                out["robust_test_acc"] = robust_accuracy(model, x_test[:n], y_test[:n], eps, alpha, ROBUST_EVAL_STEPS,
                                                         rc["eval_batch_size"], precision.prepare_input)
            return out

        rows = fit(run, Phase("train", rc["epochs"], epoch, evaluate, show=("robust_test_acc",)), {
            "model": model, "optimizer": optimizer, "scheduler": scheduler, "precision": precision,
            "shuffle_gen": GeneratorState(shuffle_gen), "aug_gen": GeneratorState(aug_gen),
            "pgd_gen": GeneratorState(pgd_gen)})
        run.save_model(model_payload(model, rc["model"], info.shape, rc["model_width"], info.name))
        run.write_file("curves.png", curves_figure(rows, f"robust model on {info.name} ({rc['model']})",
                                                   series=(("test_acc", "ACC"), ("robust_test_acc", "robust ACC"))))
        last = rows[-1]
        summary = run.finish({"method": "robust_model", "dataset": info.name, "model": rc["model"],
                              "test_acc": last["test_acc"], "robust_test_acc": last.get("robust_test_acc"),
                              "robust_test_n": min(ROBUST_EVAL_N, len(y_test)), "epochs": rc["epochs"]})
        return {"test_acc": summary["test_acc"], "robust_test_acc": summary["robust_test_acc"],
                "robust_test_n": summary["robust_test_n"], "train_seconds": summary["seconds"], "device": str(device),
                "precision": precision.description}
    finally:
        run.close()


def robust_model(cfg, dataset, resume=False, model=None, width=None, epochs=None, eps=8.0, alpha=2.0, steps=10):
    """(the model in eval mode on the CPU, its Resource): found, or built with the engine's epoch bars.
    eps, alpha: 0-255 units; model, width, epochs: see robust_recipe."""
    rc = robust_recipe(cfg, model, width, epochs, eps, alpha, steps)
    name = f"robust_model_{rc['dataset']}_{rc['model']}_s{rc['random_seed']}"
    res = obtain(resource_root(cfg), name, robust_identity(rc, dataset),
                 lambda folder, resumed: train_robust_model(folder, rc, dataset, resumed),
                 rebuild=cfg.get("resource_rebuild", False), resume=resume, resumable=True)
    print(f"robust model {res.name}: test accuracy {res.meta['test_acc']:.4f}, under PGD (eps "
          f"{rc['adv_train_eps']}/255, {ROBUST_EVAL_STEPS} steps) {res.meta['robust_test_acc']:.4f} on the first "
          f"{res.meta['robust_test_n']} test images")
    model, _ = load_model_file(res.path / "model.pt")
    return model.eval(), res
