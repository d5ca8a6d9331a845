"""Batches and the supervised training epoch.

No host sync inside the epoch: the permutation is drawn on the CPU generator (the random stream is the same on
every device) and moved to the device once, losses and predictions are summed on the device, and the figures are
read back once at the end. The sums are float64 in the same order as Python's float additions were, so the
figures are identical to the last digit to those of a per-step .item() loop.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.engine.augment import to_unit
from utils.engine.device import Precision, to_device
from utils.errors import UserError
from utils.metrics import accuracy


def batch_indices(n: int, batch_size: int, gen: torch.Generator, shuffle=True, drop_last=False, device=None):
    """The epoch's batches of indices, drawn from gen (a CPU generator); on `device` if given (one copy)."""
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    if device is not None:
        order = to_device(order, device)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def progress(iterable, desc, total=None):
    # bars go to stderr and only on a terminal: log.txt and CI logs keep the one line per epoch
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)


def weighted_sum(total, value, n):
    """total + value * n in float64 on the device (value a 0-d tensor): Python's float arithmetic, without a sync."""
    return total + value.detach().double() * n


def train_epoch_supervised(model, x, y, optimizer, precision: Precision, gen: torch.Generator, batch_size: int,
                           drop_last: bool, augment, desc="train", extra_loss=None, after_step=None, make_batch=None):
    """One epoch of cross-entropy training over (x uint8 on device, y). augment(batch_float) -> batch_float;
    make_batch(indices on the device) -> (x float, y), when a method builds its batches itself (per-batch poisoning).
    Returns mean loss, accuracy, and (order, predictions), both on the device, so callers can split metrics by
    sample kind."""
    model.train()
    batches = batch_indices(len(y), batch_size, gen, shuffle=True, drop_last=drop_last, device=x.device)
    if not batches:
        raise UserError(f"{len(y)} training samples give no batch of {batch_size}"
                        f"{' with drop_last' if drop_last else ''}; lower the batch size")
    total_loss, preds = torch.zeros((), dtype=torch.float64, device=x.device), []
    for idx in progress(batches, desc):
        if make_batch is not None:
            xb, yb = make_batch(idx)
        else:
            xb, yb = augment(to_unit(x[idx])), y[idx]
        xb = precision.prepare_input(xb)
        with precision.autocast():
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimizer.zero_grad(set_to_none=True)
        precision.step(loss, optimizer)
        if after_step is not None:
            after_step()
        total_loss = weighted_sum(total_loss, loss, len(idx))
        preds.append(logits.detach().argmax(1))
    preds, order = torch.cat(preds), torch.cat(batches)
    return {"train_loss": total_loss.item() / len(order), "train_acc": accuracy(preds, y[order])}, order, preds
