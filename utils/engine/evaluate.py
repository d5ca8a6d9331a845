"""Evaluation: predictions in eval mode, and C-ACC / ASR / RA on the clean and poisoned test sets."""
import contextlib

import torch
import torch.nn.functional as F

from utils.engine.augment import to_unit
from utils.engine.device import Precision
from utils.metrics import accuracy


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode inside, its previous mode restored afterwards (also on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(model, x_uint8, precision: Precision, batch_size=1024, labels=None, transform=None):
    """argmax predictions (and mean CE against labels, if given) in eval mode. x may be uint8 or float.
    Summed on the device and read back once; with --compile the last batch is padded to the batch size, so one
    compiled graph serves every batch."""
    preds, loss_sum, n = [], torch.zeros((), dtype=torch.float64, device=x_uint8.device), len(x_uint8)
    with eval_mode(model):
        for i in range(0, n, batch_size):
            xb = x_uint8[i:i + batch_size]
            xb = to_unit(xb) if xb.dtype == torch.uint8 else xb
            if transform is not None:
                xb = transform(xb)
            b = len(xb)
            if precision.compile and b < batch_size and n > batch_size:
                xb = torch.cat([xb, xb.new_zeros(batch_size - b, *xb.shape[1:])])
            with precision.autocast():
                logits = model(precision.prepare_input(xb)).float()[:b]
            if labels is not None:
                loss_sum += F.cross_entropy(logits, labels[i:i + batch_size], reduction="sum").double()
            preds.append(logits.argmax(1))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)
    return pred, (loss_sum.item() / max(n, 1) if labels is not None else None)


class EvalSets:
    """The clean test set and the poisoned test set, on the evaluation device."""

    def __init__(self, data, device):
        self.x_test, self.y_test = data.x_test.to(device), data.y_test.to(device)
        self.x_bd, self.y_bd = data.x_bd_test.to(device), data.y_bd_test.to(device)
        self.y_bd_true = data.y_bd_test_true.to(device)


def evaluate_backdoor(model, sets: EvalSets, precision: Precision, batch_size=1024, transform=None, prefix=""):
    """C-ACC, ASR and RA (conventions §9), plus the clean and poisoned test losses."""
    pc, clean_loss = predict(model, sets.x_test, precision, batch_size, sets.y_test, transform)
    pb, bd_loss = predict(model, sets.x_bd, precision, batch_size, sets.y_bd, transform)
    return {f"{prefix}clean_test_loss": clean_loss, f"{prefix}bd_test_loss": bd_loss,
            f"{prefix}test_acc": accuracy(pc, sets.y_test), f"{prefix}test_asr": accuracy(pb, sets.y_bd),
            f"{prefix}test_ra": accuracy(pb, sets.y_bd_true)}
