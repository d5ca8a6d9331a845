"""How strong must the trigger be for the backdoor to fire? ASR against trigger strength.

Each poisoned test image is moved a fraction a of the way from its clean original to its triggered version,
x_a = x + a (T(x) - x) in [0, 1] pixel space: a = 1 is the record's poisoned test set, a = 0 the clean images, and
in between a BadNets patch of value 255 on a black background has value 255 a, a Blended trigger blend ratio 0.2 a.
For every model listed, the script prints the ASR (share of those non-target images classified as the target) at
each strength. It shows, for instance, whether a defense that works inside a small perturbation ball (SAU's
L-infinity bound of 0.2) can reach the trigger at all: if the attacked model only responds from a = 0.6, no
perturbation of size 0.2 on the patch pixels reproduces the trigger.

    python bench/trigger_strength.py --record badnet_demo --models badnet_demo badnet_demo/defense/sau

--models takes attack records or defense records (record/<name>/defense/<defense>) trained on the record's dataset;
weights only. --plot FILE also draws the curves.
"""
import argparse
import pathlib


import torch

from utils.errors import UserError, run_main
from utils.metrics import accuracy
from utils.record import load_attack_record, load_record_model, record_path
from utils.engine.augment import to_unit
from utils.engine.device import Precision, pick_device
from utils.engine.evaluate import predict

STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def parse_strengths(v):
    try:
        return tuple(float(a) for a in v.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {v!r}") from None


def partial_trigger(x_clean, x_triggered, a):
    """x + a (T(x) - x), from uint8 images, in float pixel space (no rounding back to uint8)."""
    x = to_unit(x_clean)
    return x + a * (to_unit(x_triggered) - x)


@torch.no_grad()
def strength_table(record, models, strengths, precision, device, batch_size=1024):
    """{model name: [ASR at each strength]} on the record's poisoned test images."""
    for a in strengths:
        if not 0 <= a <= 1:
            raise UserError(f"strength {a} is outside [0, 1]; 0 is the clean image, 1 the record's trigger")
    rec = load_attack_record(record, device=device)
    data = rec.data
    x_clean, x_bd = data.x_test[data.bd_test_indices].to(device), data.x_bd_test.to(device)
    y_bd = data.y_bd_test.to(device)
    loaded = {m: precision.prepare_model(load_record_model(m, rec.config["dataset"], device)).eval() for m in models}
    table = {m: [] for m in models}
    for a in strengths:   # each partly triggered set is built once and shared by every model
        x_a = partial_trigger(x_clean, x_bd, a)
        for m, model in loaded.items():
            pred, _ = predict(model, x_a, precision, batch_size)
            table[m].append(accuracy(pred, y_bd))
    return table


def short(model, record):
    """'attack' for the record's own model, 'defense/<d>' for its defenses, the name as given otherwise."""
    m, r = record_path(model).resolve(), record_path(record).resolve()
    if m == r:
        return "attack"
    return f"defense/{m.name}" if m.parent.parent == r else str(model)


def markdown(table, strengths, record=""):
    lines = ["| model | " + " | ".join(f"a = {a:g}" for a in strengths) + " |", "|---|" + "---|" * len(strengths)]
    lines += [f"| {short(m, record)} | " + " | ".join(f"{v:.4f}" for v in row) + " |" for m, row in table.items()]
    return "\n".join(lines)


def plot(table, strengths, path, title_record):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, row in table.items():
        ax.plot(strengths, row, marker="o", label=short(m, title_record))
    ax.set(xlabel="trigger strength a (0 clean, 1 the record's trigger)", ylabel="ASR", ylim=(0, 1.02),
           title=f"ASR against trigger strength, {pathlib.Path(title_record).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", required=True, help="the attack record whose trigger is scaled")
    ap.add_argument("--models", nargs="+", required=True,
                    help="attack records or defense records (<record>/defense/<defense>) whose models are evaluated")
    ap.add_argument("--strengths", type=parse_strengths, default=STRENGTHS, help="comma-separated, each in [0, 1]")
    ap.add_argument("--plot", help="also write the curves to this png")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    table = strength_table(args.record, args.models, args.strengths, Precision(device, amp=False, channels_last=False),
                           device)
    print(markdown(table, args.strengths, args.record))
    if args.plot:
        plot(table, args.strengths, args.plot, args.record)
        print(f"plot: {args.plot}")
    return table


if __name__ == "__main__":
    run_main(main)
