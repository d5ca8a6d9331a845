"""Metrics of conventions §9, as fractions in [0, 1]."""
import torch


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """C-ACC on clean data, ASR against attack labels, RA against true labels: the same count."""
    if len(labels) == 0:
        return float("nan")
    return (pred == labels).float().mean().item()


def der(acc_nodef, asr_nodef, acc_def, asr_def) -> float:
    """Defense effectiveness rating, with the ACC drop subtracted (BackdoorBench's simplified form)."""
    return (max(0.0, asr_nodef - asr_def) - max(0.0, acc_nodef - acc_def) + 1) / 2


def rir(acc_nodef, ra_nodef, acc_def, ra_def) -> float:
    """Robust improvement rate."""
    return (max(0.0, ra_def - ra_nodef) - max(0.0, acc_nodef - acc_def) + 1) / 2
