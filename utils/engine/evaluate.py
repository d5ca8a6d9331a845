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
        self.num_classes = data.num_classes
        self.x_test, self.y_test = data.x_test.to(device), data.y_test.to(device)
        self.x_bd, self.y_bd = data.x_bd_test.to(device), data.y_bd_test.to(device)
        self.y_bd_true = data.y_bd_test_true.to(device)
        cross = getattr(data, "x_cross_test", None)   # every test image through the trigger's cross transform
        self.x_cross = cross.to(device) if cross is not None else None


def cross_accuracy(model, sets: EvalSets, precision: Precision, batch_size=1024) -> dict:
    """Accuracy against the true labels on the cross test set (WaNet's noise, BppAttack's negatives, Input-Aware's
    cross-trigger images): a model that reacts to the transform itself, not to the trigger, fails it."""
    pred, loss = predict(model, sets.x_cross, precision, batch_size, labels=sets.y_test)
    return {"test_cross_acc": accuracy(pred, sets.y_test), "cross_test_loss": loss}


BREAKDOWN = ("test_other", "test_top_wrong_class", "test_top_wrong", "bd_pred_per_class")


def prediction_breakdown(pred, y_attack, y_true, num_classes, prefix=""):
    """Where the poisoned test predictions go (conventions §9): besides the true label (RA) and the attack's label
    (ASR), to any other class (test_other), the most frequent of those classes and its share of the poisoned test
    set, and the share of every class ('0.0012;0.9971;...', class 0 first). A low ASR with a low RA is not a
    removed backdoor: the predictions went elsewhere, and the breakdown says where."""
    n = max(len(pred), 1)
    other = (pred != y_attack) & (pred != y_true)
    wrong = torch.bincount(pred[other], minlength=num_classes)
    per_class = (torch.bincount(pred, minlength=num_classes).double() / n).tolist()
    top = int(wrong.argmax()) if int(wrong.sum()) else None
    return {f"{prefix}test_other": float(other.sum()) / n, f"{prefix}test_top_wrong_class": top,
            f"{prefix}test_top_wrong": float(wrong[top]) / n if top is not None else 0.0,
            f"{prefix}bd_pred_per_class": ";".join(f"{v:.6g}" for v in per_class)}


def evaluate_backdoor(model, sets: EvalSets, precision: Precision, batch_size=1024, transform=None, prefix=""):
    """C-ACC, ASR and RA (conventions §9), the clean and poisoned test losses, and where the poisoned test
    predictions go (prediction_breakdown)."""
    pc, clean_loss = predict(model, sets.x_test, precision, batch_size, sets.y_test, transform)
    pb, bd_loss = predict(model, sets.x_bd, precision, batch_size, sets.y_bd, transform)
    return {f"{prefix}clean_test_loss": clean_loss, f"{prefix}bd_test_loss": bd_loss,
            f"{prefix}test_acc": accuracy(pc, sets.y_test), f"{prefix}test_asr": accuracy(pb, sets.y_bd),
            f"{prefix}test_ra": accuracy(pb, sets.y_bd_true),
            **prediction_breakdown(pb, sets.y_bd, sets.y_bd_true, sets.num_classes, prefix)}


def breakdown_summary(row, prefix=""):
    """The breakdown of a metrics row for summary.json: the per-class shares as a list of numbers."""
    out = {f"{prefix}{k}": row.get(f"{prefix}{k}") for k in BREAKDOWN if f"{prefix}{k}" in row}
    key = f"{prefix}bd_pred_per_class"
    if isinstance(out.get(key), str):
        out[key] = [float(v) for v in out[key].split(";") if v]
    return out


def breakdown_line(row, prefix=""):
    """'other 2.3 % (most: class 9, 1.9 %)' for the end-of-run table."""
    other, top = row.get(f"{prefix}test_other"), row.get(f"{prefix}test_top_wrong_class")
    if other is None:
        return ""
    most = f" (most: class {top}, {100 * row[f'{prefix}test_top_wrong']:.1f} %)" if top is not None else ""
    return f"other {100 * other:.1f} %{most}"
