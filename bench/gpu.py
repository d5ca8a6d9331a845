"""Device check (not a test): how fast this toolkit trains on a GPU, in one table per question.

1. Model throughput: PreAct-ResNet-18 training steps on CIFAR-shaped synthetic data already on the device,
   {fp32, bf16} x {channels_last off, on} x {eager, compile} at batch 128 and 512: img/s, seconds per epoch of
   50,000 images (CUDA events, warm-up excluded), peak memory.
2. Many runs per card: the same step in 1 and in 4 processes at once on one card (the sweep's num_gpus 0.25).
3. The real pipeline: one epoch of `attack/badnet.py --dataset cifar10`-shaped work (poisoned uint8 data on the
   device, batched crop and flip, the toolkit's epoch with its per-kind metrics) against the bare loop on
   pre-made float tensors; the ratio is what the pipeline costs.

    python bench/gpu.py                   # on a GPU machine: under 8 minutes on one card
    python bench/gpu.py --smoke           # a few seconds on a CPU: a tiny model, every code path (a test runs it)
"""
import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from models import build_model
from utils.data import DATASETS, Dataset
from utils.engine.device import Precision, cpu_bf16, pick_device
from utils.engine.optim import fused
from utils.engine.timing import Stopwatch
from utils.errors import run_main

CIFAR = DATASETS["cifar10"]
EPOCH = 50_000


def model_for(args, precision):
    torch.manual_seed(0)
    m = build_model(args.model, 10, 3, CIFAR.mean, CIFAR.std, args.width)
    return precision.prepare_model(m)


def bare_steps(model, precision, x, y, batch, steps, opt):
    """`steps` training steps over pre-made float batches (cycled)."""
    n = len(y) // batch
    for s in range(steps):
        i = (s % n) * batch
        with precision.autocast():
            out = model(precision.prepare_input(x[i:i + batch]))
        loss = F.cross_entropy(out.float(), y[i:i + batch])
        opt.zero_grad(set_to_none=True)
        precision.step(loss, opt)


def synthetic(device, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *CIFAR.shape), generator=g, dtype=torch.uint8)
    return x.to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def throughput(args, device, amp, cl, compile_, batch):
    """img/s, s per epoch and peak memory of one setting."""
    precision = Precision(device, amp, cl, compile_)
    if compile_ and not precision.compile:
        return None   # compile unavailable here: Precision said why
    model = model_for(args, precision).train()
    x8, y = synthetic(device, batch * 4)
    x = x8.float() / 255
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, **fused(params))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bare_steps(model, precision, x, y, batch, args.warmup, opt)   # compile, autotuning, allocator
    t = Stopwatch(device)
    t.start()
    bare_steps(model, precision, x, y, batch, args.steps, opt)
    t.stop()
    seconds = t.total()
    ips = batch * args.steps / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"img_per_s": ips, "epoch_s": EPOCH / ips, "peak_gib": peak, "precision": precision.description}


def worker(args):
    """One process of section 2: its own img/s, as JSON on stdout."""
    device = pick_device(args.device)
    r = throughput(args, device, args.amp_on, True, False, args.batch_sizes[0])
    print(json.dumps(r))


def concurrent(args, device, procs):
    """Total img/s of `procs` processes training at once on the device."""
    cmd = [sys.executable, __file__, "--worker", "--device", str(device), "--model", args.model, "--width",
           str(args.width), "--steps", str(args.steps * 2), "--warmup", str(args.warmup), "--batch_sizes",
           str(args.batch_sizes[0]), "--amp_on", str(int(args.amp_on))]
    t0 = time.perf_counter()
    ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = [p.communicate() for p in ps]
    wall = time.perf_counter() - t0
    bad = [err.strip().splitlines()[-1:] for (out, err), p in zip(outs, ps) if p.returncode]
    if bad:
        raise RuntimeError(f"a worker failed: {bad[0]}")
    rates = [json.loads(out.strip().splitlines()[-1])["img_per_s"] for out, _ in outs]
    return sum(rates), wall


def real_vs_bare(args, device, amp):
    """Seconds of one real BadNets-shaped epoch (the toolkit's standard_epoch) and of the bare loop on the same
    images, model and precision."""
    from attack.badnet import configure
    from utils.attack import attack_context, standard_epoch
    from utils.poison import build_poisoned_data, plan_poison

    n = args.real_images
    cfg, _, trigger, _ = configure(["--dataset", "cifar10", "--model", args.model, "--model_width", str(args.width),
                                    "--device", str(device)])
    x8, y = synthetic("cpu", n + 100, seed=1)
    info = CIFAR
    dataset = Dataset(info, x8[:n], y[:n], x8[n:], y[n:])
    plan = plan_poison(dataset.y_train, 10, 0.1, None, "all2one", 0, 1, 0.0, "random", 0)
    data = build_poisoned_data(dataset, trigger, plan)
    precision = Precision(device, amp, True)
    times = {}
    for name in ("bare", "real"):
        model = model_for(args, precision)
        ctx = attack_context(cfg, model, precision, data, device)
        if name == "bare":
            x = precision.prepare_input(ctx.x_train.float() / 255)
            steps = n // cfg["batch_size"]
            bare_steps(model, precision, x, ctx.y_train, cfg["batch_size"], args.warmup, ctx.optimizer)
            t = Stopwatch(device)
            t.start()
            bare_steps(model, precision, x, ctx.y_train, cfg["batch_size"], steps, ctx.optimizer)
            t.stop()
            times[name] = t.total()
        else:
            bare_steps(model, precision, ctx.x_train.float() / 255, ctx.y_train, cfg["batch_size"], args.warmup,
                       ctx.optimizer)
            t = Stopwatch(device)
            t.start()
            standard_epoch(ctx)
            t.stop()
            times[name] = t.total()
    return times, cfg["batch_size"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="a tiny model on a few images (CPU, a few seconds)")
    p.add_argument("--model", default="preactresnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[128, 512])
    p.add_argument("--steps", type=int, default=60, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps first (compile, autotuning)")
    p.add_argument("--procs", type=int, default=4, help="processes of section 2")
    p.add_argument("--real_images", type=int, default=50_000, help="images of section 3's epoch")
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--amp_on", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.device, args.width, args.batch_sizes, args.steps, args.warmup = "cpu", 4, [16], 2, 1
        args.procs, args.real_images, args.no_compile = 2, 256, True
    device = pick_device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {gpu}, torch {torch.__version__}, {args.model} width {args.width}, CIFAR-shaped synthetic data\n")

    amps = [False, True] if device.type == "cuda" or cpu_bf16() else [False]
    compiles = [False] if args.no_compile else [False, True]
    print("| precision | channels_last | compile | batch | img/s | s / epoch of 50k | peak GiB |\n|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        for amp in amps:
            for cl in (False, True):
                for c in compiles:
                    r = throughput(args, device, amp, cl, c, batch)
                    if r is None:
                        print(f"| {'bf16' if amp else 'fp32'} | {cl} | {c} | {batch} | unavailable | | |")
                        continue
                    print(f"| {r['precision'].split(' + ')[0]} | {cl} | {c} | {batch} | {r['img_per_s']:.0f} | "
                          f"{r['epoch_s']:.2f} | {r['peak_gib']:.2f} |", flush=True)

    args.amp_on = amps[-1]
    one, _ = concurrent(args, device, 1)
    many, wall = concurrent(args, device, args.procs)
    print(f"\n| processes on one {'card' if device.type == 'cuda' else 'CPU'} | total img/s | vs one |\n|---|---|---|\n"
          f"| 1 | {one:.0f} | 1.00x |\n| {args.procs} | {many:.0f} | {many / one:.2f}x |")

    times, b = real_vs_bare(args, device, amps[-1])
    print(f"\n| one epoch of {args.real_images} images, batch {b} | seconds |\n|---|---|\n"
          f"| bare loop (pre-made float tensors) | {times['bare']:.2f} |\n"
          f"| real pipeline (badnet, cifar10-shaped) | {times['real']:.2f} |\n"
          f"\nreal / bare = {times['real'] / times['bare']:.2f}  (goal <= 1.1)")
    return times


if __name__ == "__main__":
    run_main(main)
