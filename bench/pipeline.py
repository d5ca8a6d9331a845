"""Benchmark (not a test): one training epoch of three pipelines on the same model, data and precision.

1. real:         this toolkit's pipeline (uint8 tensors, batched augmentation, utils.engine.epoch.train_epoch_supervised)
2. bare:         forward/backward/step on pre-made float tensors (no augmentation, no indexing): the floor
3. synced:       the real pipeline with a host read-back of the loss and the predictions after every step, as the
                 epoch loop was written before it summed on the device (on a CPU the two should cost the same;
                 on a GPU every read-back waits for the queued kernels)
4. conventional: per-image PIL transforms (RandomCrop) in a torch DataLoader with worker processes, as
                 BackdoorBench's pipeline does

    python bench/pipeline.py                       # Fashion-MNIST, compact CNN, the prototype's settings
    python bench/pipeline.py --model preactresnet18 --limit 6000
    python bench/pipeline.py --rounds 3            # every pipeline three times, interleaved; the best of each
"""
import argparse
import time


import torch
import torch.nn.functional as F

from models import build_model
from utils.data import load_dataset
from utils.poison import build_poisoned_data, plan_poison
from utils.engine.augment import random_crop_flip
from utils.engine.device import Precision
from utils.engine.epoch import train_epoch_supervised
from utils.triggers import PatchTrigger, badnet_pattern
from utils.errors import run_main


class PILDataset(torch.utils.data.Dataset):
    """What a conventional pipeline does: one PIL image per sample, transformed one at a time."""

    def __init__(self, x, y, padding):
        import torchvision.transforms as T
        self.x, self.y = x.numpy(), y.numpy()
        self.t = T.Compose([T.RandomCrop(x.shape[-1], padding=padding), T.ToTensor()])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        a = self.x[i]
        img = Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB")
        return self.t(img), int(self.y[i])


def new_model(args, info, precision):  # same init for every pipeline
    torch.manual_seed(0)
    m = build_model(args.model, info.num_classes, info.shape[0], info.mean, info.std)
    return precision.prepare_model(m), None


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--padding", type=int, default=2)
    p.add_argument("--limit", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="timings per pipeline, interleaved (the best is reported)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)

    d = load_dataset(args.dataset)
    info = d.info
    plan = plan_poison(d.y_train, info.num_classes, 0.1, None, "all2one", 0, 1, 0.0, "random", 0)
    data = build_poisoned_data(d, PatchTrigger(badnet_pattern(info.shape)), plan)
    x, y = data.x_train, data.y_train
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    n = len(y)
    precision = Precision(torch.device("cpu"), bool(args.amp), True)
    print(f"{n} images of {args.dataset}, model {args.model}, batch {args.batch_size}, {precision.description}, "
          f"{torch.get_num_threads()} threads")

    def timed(fn):
        model, _ = new_model(args, info, precision)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        fn(model, opt, warmup=True)  # a few steps so that oneDNN builds its kernels outside the timing
        t = time.perf_counter()
        fn(model, opt, warmup=False)
        return time.perf_counter() - t

    def real(model, opt, warmup):
        g = torch.Generator().manual_seed(0)
        xs, ys = (x[:8 * args.batch_size], y[:8 * args.batch_size]) if warmup else (x, y)
        train_epoch_supervised(model, xs, ys, opt, precision, g, args.batch_size, True,
                               lambda b: random_crop_flip(b, g, args.padding, False))

    def synced(model, opt, warmup):
        g = torch.Generator().manual_seed(0)
        xs, ys = (x[:8 * args.batch_size], y[:8 * args.batch_size]) if warmup else (x, y)
        model.train()
        order, total, preds = torch.randperm(len(ys), generator=g), 0.0, []
        for i in range(0, len(ys) - len(ys) % args.batch_size, args.batch_size):
            idx = order[i:i + args.batch_size]
            xb = precision.prepare_input(random_crop_flip(xs[idx].float().div_(255), g, args.padding, False))
            with precision.autocast():
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)          # the per-step read-backs
            preds.append(logits.argmax(1).cpu())

    xf = x.float() / 255  # the bare loop's pre-made tensors
    xf = precision.prepare_input(xf)

    def bare(model, opt, warmup):
        model.train()
        stop = 8 * args.batch_size if warmup else n - n % args.batch_size
        for i in range(0, stop, args.batch_size):
            with precision.autocast():
                out = model(xf[i:i + args.batch_size])
            loss = F.cross_entropy(out.float(), y[i:i + args.batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def conventional(model, opt, warmup):
        model.train()
        ds = PILDataset(x[:8 * args.batch_size] if warmup else x, y[:8 * args.batch_size] if warmup else y, args.padding)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=False)
        for xb, yb in loader:
            with precision.autocast():
                out = model(precision.prepare_input(xb))
            loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    pipelines = [("bare", bare), ("real", real), ("synced", synced), ("conventional", conventional)]
    times = {name: float("inf") for name, _ in pipelines}
    for _ in range(args.rounds):
        for name, fn in pipelines:
            times[name] = min(times[name], timed(fn))
    report(times, n)


def report(times, n):
    print("\n| pipeline | seconds per epoch | img/s | vs bare |\n|---|---|---|---|")
    for name, s in times.items():
        print(f"| {name} | {s:.1f} | {n / s:.0f} | {s / times['bare']:.2f}x |")
    print(f"\nreal / bare = {times['real'] / times['bare']:.2f}  (goal <= 1.15)")
    print(f"synced / real = {times['synced'] / times['real']:.2f}  (the per-step read-backs)")
    print(f"conventional / real = {times['conventional'] / times['real']:.2f}  (goal > 1)")


if __name__ == "__main__":
    run_main(main)
