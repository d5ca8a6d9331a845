"""Does SAU's inner search ever find the backdoor? (issue 16, docs/experiments/sau_residual.md.) No training: for
each attack record's model, on SAU's clean subset (the record's attacker-clean training images, the same seeded
5 % draw a SAU run makes), the adversarial examples of two searches inside SAU's L-inf ball of 0.2:

- SAU's first-round shared PGD (defense/sau.py shared_pgd, its options: 5 sign steps of 0.2 from +eps, batches of
  256). In round one f_theta and the frozen reference are the same model, so the shared examples are the model's
  own untargeted adversarial examples;
- a targeted PGD towards the attack's target: 20 sign steps of eps/8 descending the cross-entropy of the target
  label, from a seeded uniform start in the ball, at SAU's eps 0.2 and at smaller budgets (--targeted_eps).

Reported per record: how often the adversarial prediction is the target (over samples whose true label is not the
target), how often SAU's search moves the prediction at all, the target's share among the moved ones, and the
top class among them. If a backdoored model's examples land in the target no more often than a clean model's, the
search never exposes that backdoor and SAU has nothing to unlearn. As in SAU, images are not clamped to [0, 1].

    python bench/pgd_landing.py record/sweep_demo_seeds/badnet_fashion_mnist_cnn_p0.1_t0_s0 \\
        record/sweep_demo_seeds/blend_fashion_mnist_cnn_p0.1_t0_s0 record/clean_fashion_mnist_cnn_s0
"""
import argparse
import copy

import torch
import torch.nn.functional as F

from defense.sau import shared_pgd
from utils.engine.augment import to_unit
from utils.engine.device import Precision
from utils.errors import run_main
from utils.model_file import load_defense_model
from utils.poison import defender_clean_subset
from utils.record import load_attack_record
from utils.seeding import generator

SAU = {"trigger_norm": 0.2, "adv_lr": 0.2, "adv_steps": 5, "beta_1": 0.01, "beta_2": 1.0, "batch_size": 256}
TARGETED_STEPS = 20


def targeted_pgd(model, x, target, eps, alpha, steps, gen):
    """L-inf PGD descending CE(model(x + delta), target), from a uniform start; returns the final predictions."""
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    t = torch.full((len(x),), target, dtype=torch.long)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), t)
        grad, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - alpha * grad.sign()).clamp_(-eps, eps)
    with torch.no_grad():
        return model(x + delta).argmax(1)


def landing(record_path, ratio, seed, targeted_eps):
    record = load_attack_record(record_path, device="cpu")
    data, target = record.data, int(record.poison["attack_target"])
    model = load_defense_model(record.path / "model.pt").eval().requires_grad_(False)
    ref = copy.deepcopy(model)
    idx, _ = defender_clean_subset(data, ratio, False, seed, None)   # SAU's own draw (balanced: no)
    x, y = to_unit(data.x_train_clean[idx]), data.y_train_true[idx]
    precision = Precision(torch.device("cpu"), amp=False, channels_last=False)
    preds0, preds_sau, preds_t = [], [], {e: [] for e in targeted_eps}
    gen = generator(seed, "targeted_pgd")
    for i in range(0, len(y), SAU["batch_size"]):
        xb, yb = x[i:i + SAU["batch_size"]], y[i:i + SAU["batch_size"]]
        delta, _ = shared_pgd(model, ref, xb, yb, SAU, precision)
        with torch.no_grad():
            preds0.append(model(xb).argmax(1))
            preds_sau.append(model(xb + delta).argmax(1))
        for e in targeted_eps:
            preds_t[e].append(targeted_pgd(model, xb, target, e, e / 8, TARGETED_STEPS, gen))
    p0, ps = torch.cat(preds0), torch.cat(preds_sau)
    keep = y != target
    moved = (ps != p0) & keep
    others = ps[moved]
    top = torch.bincount(others, minlength=data.num_classes) if len(others) else None
    return {"record": record.path.name, "attack": record.poison["attack"], "n": int(keep.sum()),
            "sau_to_target": float((ps[keep] == target).float().mean()),
            "sau_moved": float(moved.sum() / keep.sum()),
            "target_share_of_moved": float((others == target).float().mean()) if len(others) else float("nan"),
            "top_moved_class": int(top.argmax()) if top is not None else None,
            "top_moved_share": float(top.max() / len(others)) if top is not None else float("nan"),
            "targeted_success": {e: float((torch.cat(v)[keep] == target).float().mean()) for e, v in preds_t.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+", help="attack records (folders)")
    p.add_argument("--ratio", type=float, default=0.05, help="SAU's clean subset, a fraction of the training set")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed (a SAU run's random_seed)")
    p.add_argument("--targeted_eps", type=float, nargs="+", default=[0.2, 0.1, 0.05],
                   help="budgets of the targeted PGD (pixel units)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    eps_cols = " | ".join(f"targeted eps {e:g} %" for e in args.targeted_eps)
    print(f"| record | n | SAU PGD -> target % | SAU PGD moved % | target share of moved % | top moved class (share %) "
          f"| {eps_cols} |\n|---|---:|---:|---:|---:|---|{'---:|' * len(args.targeted_eps)}")
    for r in args.records:
        m = landing(r, args.ratio, args.seed, args.targeted_eps)
        t = " | ".join(f"{100 * v:.2f}" for v in m["targeted_success"].values())
        print(f"| {m['record']} | {m['n']} | {100 * m['sau_to_target']:.2f} | {100 * m['sau_moved']:.2f} | "
              f"{100 * m['target_share_of_moved']:.2f} | {m['top_moved_class']} ({100 * m['top_moved_share']:.1f}) | "
              f"{t} |", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
