"""Batches and the supervised training epoch."""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.engine.augment import to_unit
from utils.engine.device import Precision
from utils.errors import UserError
from utils.metrics import accuracy


def batch_indices(n: int, batch_size: int, gen: torch.Generator, shuffle=True, drop_last=False):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def progress(iterable, desc, total=None):
    # bars go to stderr and only on a terminal: log.txt and CI logs keep the one line per epoch
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)


def train_epoch_supervised(model, x, y, optimizer, precision: Precision, gen: torch.Generator, batch_size: int,
                           drop_last: bool, augment, desc="train", extra_loss=None, after_step=None, make_batch=None):
    """One epoch of cross-entropy training over (x uint8 on device, y). augment(batch_float) -> batch_float;
    make_batch(indices on the device) -> (x float, y), when a method builds its batches itself (per-batch poisoning).
    Returns mean loss, accuracy, and (order, predictions) so callers can split metrics by sample kind."""
    model.train()
    batches = batch_indices(len(y), batch_size, gen, shuffle=True, drop_last=drop_last)
    if not batches:
        raise UserError(f"{len(y)} training samples give no batch of {batch_size}"
                        f"{' with drop_last' if drop_last else ''}; lower the batch size")
    total_loss, seen, preds, order = 0.0, 0, [], []
    for idx in progress(batches, desc):
        dev_idx = idx.to(x.device)
        if make_batch is not None:
            xb, yb = make_batch(dev_idx)
        else:
            xb, yb = augment(to_unit(x[dev_idx])), y[dev_idx]
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
        total_loss += loss.item() * len(idx)
        seen += len(idx)
        preds.append(logits.argmax(1).cpu())
        order.append(idx)
    preds, order = torch.cat(preds), torch.cat(order)
    return {"train_loss": total_loss / max(seen, 1), "train_acc": accuracy(preds, y.cpu()[order])}, order, preds
