"""Benchmark (not a test): training-step throughput of each precision and memory layout on this CPU, side by side
in one process, and what `--amp auto --channels_last auto` (the default) chooses.

The candidates run in interleaved rounds (each keeps its best), so a burst of load on the machine hits them alike;
the ratio to plain fp32 is the figure to read, not the absolute img/s.

    python bench/precision.py                                   # compact CNN and PreAct-ResNet-18, 28x28 grey
    python bench/precision.py --models resnet18 --shape 3 32 32 --rounds 3
"""
import argparse

import torch

from models import build_model
from utils.engine.device import cpu_bf16
from utils.engine.probe import PROBE_BATCH, label, measure, processor, resolve_precision
from utils.errors import run_main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn", "preactresnet18"])
    p.add_argument("--shape", nargs=3, type=int, default=[1, 28, 28], metavar=("C", "H", "W"))
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per candidate")
    p.add_argument("--round_seconds", type=float, default=1.0, help="a round: one step, or as many as take this long")
    a = p.parse_args(argv)
    cpu = torch.device("cpu")
    candidates = [(amp, cl) for amp in ([False, True] if cpu_bf16() else [False]) for cl in (False, True)]
    print(f"{processor()}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch_size}, "
          f"input {tuple(a.shape)}\n")
    print("| model | " + " | ".join(label(*c) for c in candidates) + " | default (auto) chooses |")
    print("|---|" + "---|" * (len(candidates) + 1))
    for name in a.models:
        torch.manual_seed(0)
        model = build_model(name, 10, a.shape[0], (0.5,) * a.shape[0], (0.5,) * a.shape[0])
        rates = measure(model, cpu, candidates, a.shape, a.batch_size, a.rounds, a.round_seconds)
        amp, cl, how = resolve_precision({"amp": "auto", "channels_last": "auto"}, cpu, model,
                                         f"{name} width None", a.shape, a.batch_size)
        cells = [f"{r:,.0f} img/s ({r / rates[0]:.2f}x)" for r in rates]
        print(f"| {name} | " + " | ".join(cells) + f" | {label(amp, cl)} ({how['source']}, probe batch "
              f"{min(a.batch_size, PROBE_BATCH)}) |", flush=True)


if __name__ == "__main__":
    run_main(main)
