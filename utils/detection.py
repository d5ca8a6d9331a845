"""Detection metrics, threshold-free and at a detector's own threshold, for every detector of the toolkit (a
poisoned-sample filter, an input detector, a model-level detector). Scores follow one convention: higher means
more suspicious; labels are 1 for the positives (poisoned samples, triggered inputs, backdoored models)."""
import torch


def _split(scores, labels):
    s, pos = torch.as_tensor(scores).double().flatten().cpu(), torch.as_tensor(labels).flatten().cpu().bool()
    if len(s) != len(pos):
        raise ValueError(f"{len(s)} scores for {len(pos)} labels")
    return s, pos


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted one half); nan when a class is missing."""
    s, pos = _split(scores, labels)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]          # average rank of tied values, 1-based
    return ((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)).item()


def roc_points(scores, labels):
    """(fpr, tpr, thresholds) of the rule 'flag when score >= threshold' at every distinct score, highest first,
    with the empty rule (threshold +inf: nothing flagged) as the first point. Counts per distinct score,
    accumulated from the top: O(n log n), so a filter's 60,000 training samples cost no n x n matrix."""
    s, pos = _split(scores, labels)
    values, inverse = torch.unique(s, return_inverse=True)          # ascending
    n_pos = torch.bincount(inverse, weights=pos.double(), minlength=len(values)).flip(0)
    n_neg = torch.bincount(inverse, weights=(~pos).double(), minlength=len(values)).flip(0)
    n1, n0 = max(int(pos.sum()), 1), max(int((~pos).sum()), 1)
    zero = torch.zeros(1, dtype=torch.float64)
    return (torch.cat([zero, n_neg.cumsum(0) / n0]), torch.cat([zero, n_pos.cumsum(0) / n1]),
            torch.cat([torch.tensor([float("inf")], dtype=torch.float64), values.flip(0)]))


def tpr_at_fpr(scores, labels, max_fpr: float) -> float:
    """The highest true-positive rate of a threshold whose false-positive rate is at most max_fpr (a point of
    the ROC step function, never interpolated); nan when a class is missing."""
    s, pos = _split(scores, labels)
    if not pos.any() or pos.all():
        return float("nan")
    fpr, tpr, _ = roc_points(s, pos)
    return tpr[fpr <= max_fpr + 1e-12].max().item()


def at_threshold(flags, labels) -> dict:
    """Precision, recall (TPR) and false-positive rate of a set of flags (the detector's own decision)."""
    f, pos = torch.as_tensor(flags).flatten().bool().cpu(), torch.as_tensor(labels).flatten().bool().cpu()
    tp, fp = int((f & pos).sum()), int((f & ~pos).sum())
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return {"flagged": int(f.sum()), "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / n1 if n1 else float("nan"), "fpr": fp / n0 if n0 else float("nan")}


def detection_metrics(scores, labels, flags=None, prefix="det_") -> dict:
    """AUROC and TPR at 1 % and 5 % FPR of the scores, and, given the detector's flags, its precision, recall and
    FPR at its own threshold; keys prefixed (det_auroc, det_tpr_at_fpr_0.01, ...)."""
    out = {"auroc": roc_auc(scores, labels), "tpr_at_fpr_0.01": tpr_at_fpr(scores, labels, 0.01),
           "tpr_at_fpr_0.05": tpr_at_fpr(scores, labels, 0.05)}
    if flags is not None:
        out.update(at_threshold(flags, labels))
    return {f"{prefix}{k}": v for k, v in out.items()}
