"""Benchmark (not a test): training-step throughput of a model with and without channels_last, in fp32.

Answers whether the channels_last default costs speed on a CPU without bf16 (it does not on the project's AVX2
machine: PreAct-ResNet-18 runs at 23 img/s with it and 21 img/s without).

    python bench/channels_last.py                                  # preactresnet18 and cnn, 28x28 grey images
    python bench/channels_last.py --models resnet18 --shape 3 32 32 --steps 3
"""
import argparse
import time


import torch
import torch.nn.functional as F

from models import build_model
from utils.errors import run_main


def images_per_second(name, shape, batch, steps, channels_last):
    torch.manual_seed(0)
    model = build_model(name, 10, shape[0], (0.5,) * shape[0], (0.5,) * shape[0])
    x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(steps + 1):  # step 0 warms up (allocations, kernel choice) and is not timed
        if step == 1:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["preactresnet18", "cnn"])
    p.add_argument("--shape", nargs=3, type=int, default=[1, 28, 28], metavar=("C", "H", "W"))
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed training steps per setting (more for small models)")
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {a.batch_size}, "
          f"input {tuple(a.shape)}")
    for name in a.models:
        steps = a.steps if name != "cnn" else max(a.steps, 30)
        off, on = (images_per_second(name, a.shape, a.batch_size, steps, cl) for cl in (False, True))
        print(f"{name:16s} channels_last off {off:8.1f} img/s   on {on:8.1f} img/s   (on/off {on / off:.2f}x)", flush=True)


if __name__ == "__main__":
    run_main(main)
