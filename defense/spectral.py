"""Spectral Signatures (Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018, arXiv 1811.00636;
spec: docs/specs/spectral.md).

Poisoned samples of a label leave a trace in the covariance of the attacked model's representations: along the top
singular direction of the label's centred representations they lie far out. Spectral Signatures scores every
training sample of each label by its squared projection on that direction, removes the 1.5 eps highest-scoring
fraction of every label, and trains a fresh model on what is left with the attack's own recipe.

    python defense/spectral.py --result_file badnet_demo

Project decisions (spec §7): the paper's centred score (both codes project uncentred features: `--score
uncentred`; the other score's AUROC is always reported), every label scored (the authors' code scores the known
target only: `--target_label`), representations un-augmented in eval mode and fp32, eps a fraction of each label
set, a count rule with a stable tie order, retraining with the attack's recipe (each override a deviation).
"""
import torch

from utils.config import Opt, in_range
from utils.defense import defense_config
from utils.detection import roc_auc
from utils.errors import UserError, run_main
from utils.filtering import check_layer, representations, run_filter
from utils.registry import register
from utils.retrain import recipe_override_options

OPTIONS = [
    Opt("eps", float, 0.1, "assumed upper bound on the poisoned fraction of a label set",
        check=in_range(0, 1, lo_open=True, hi_open=True)),
    Opt("eps_multiplier", float, 1.5, "removed from each label set: floor(eps_multiplier * eps * n_y)",
        check=in_range(0, lo_open=True)),
    Opt("target_label", int, None, "score only this label set (an oracle when it is the attack's target)",
        check=in_range(0)),
    Opt("score", str, "centred", "centred: ((h - mu) . v)^2, the paper; uncentred: |h . v|, both codes",
        choices=("centred", "uncentred")),
    Opt("layer", str, "features", "representation: `features` (penultimate vector) or a stage's name (layer4: "
        "BackdoorBench on the ResNets)"),
    *recipe_override_options(),
]


# --- 1. the score of one label set ----------------------------------------------------------------------------

def spectral_scores(h: torch.Tensor):
    """(centred score ((h_i - mu) . v)^2, uncentred score |h_i . v|, singular values) of one label set's
    representations h (n x d), in float64; v is the top right singular vector of the centred matrix."""
    h = h.double()
    c = h - h.mean(0, keepdim=True)
    if len(h) < 2:
        zero = torch.zeros(len(h), dtype=torch.float64)
        return zero, zero.clone(), torch.zeros(1, dtype=torch.float64)
    _, s, vh = torch.linalg.svd(c, full_matrices=False)
    v = vh[0]
    if s[0] == 0:
        return torch.zeros(len(h), dtype=torch.float64), torch.zeros(len(h), dtype=torch.float64), s
    return (c @ v) ** 2, (h @ v).abs(), s


def removal_count(n: int, eps: float, multiplier: float) -> int:
    """floor(m eps n), the 1e-9 absorbing binary rounding (1.5 * 0.1 * 20 must give 3)."""
    return min(n, int(multiplier * eps * n + 1e-9))


def remove_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k highest scores; ties broken towards the lower position (the lower training index)."""
    order = torch.sort(-scores, stable=True).indices
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


# --- 2. every label set ---------------------------------------------------------------------------------------

def detect(ctx, model):
    """Scores and the removed set over data.train_indices, each label decided on its own scores only. The
    detection scores are normalised per label (divided by the label's mean score), so labels can be pooled."""
    cfg, data = ctx.cfg, ctx.data
    check_layer(model, cfg["layer"])
    tr = data.train_indices
    labels = data.y_train[tr]
    h = representations(model, data.x_train[tr].to(ctx.device), cfg["layer"], cfg["eval_batch_size"])
    n = len(tr)
    main, alt = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    removed = torch.zeros(n, dtype=torch.bool)
    classes = []
    scored = [cfg["target_label"]] if cfg["target_label"] is not None else range(data.num_classes)
    for y in scored:
        pos = torch.nonzero(labels == y).flatten()
        if len(pos) == 0:
            continue
        centred, uncentred, s = spectral_scores(h[pos])
        score, other = (centred, uncentred) if cfg["score"] == "centred" else (uncentred, centred)
        k = removal_count(len(pos), cfg["eps"], cfg["eps_multiplier"]) if s[0] > 0 else 0
        if s[0] == 0:
            print(f"spectral: label {y}: every representation is the same; nothing removed there")
        cut = remove_top(score, k)
        removed[pos[cut]] = True
        m, m_alt = score.mean(), other.mean()
        main[pos] = score / m if m > 0 else 0.0
        alt[pos] = other / m_alt if m_alt > 0 else 0.0
        p = data.poison_indicator[tr[pos]].bool()
        classes.append({"label": y, "n": len(pos), "n_poisoned": int(p.sum()), "removed": k,
                        "removed_poisoned": int((cut & p).sum()), "sigma1": s[0].item(),
                        "sigma2": s[1].item() if len(s) > 1 else 0.0, "auroc": roc_auc(score, p)})
    poisoned = data.poison_indicator[tr].bool()
    target = ctx.record.poison["attack_target"] if ctx.record.poison["attack_label_trans"] == "all2one" else None
    extras = {"det_auroc_all_alt": roc_auc(alt, poisoned), "representation_dim": h.shape[1]}
    if target is not None:
        t = (labels == target).cpu()
        extras.update(det_auroc_target=roc_auc(main[t], poisoned[t]), det_auroc_target_alt=roc_auc(alt[t], poisoned[t]))
    ctx.run.write_file("classes.csv", "label,n,n_poisoned,removed,removed_poisoned,sigma1,sigma2,auroc\n" + "".join(
        ",".join(f"{c[k]:.6g}" if isinstance(c[k], float) else str(c[k]) for k in c) + "\n" for c in classes))
    return removed, main, extras


def check_settings(cfg):
    if cfg["eps"] * cfg["eps_multiplier"] >= 1:
        raise UserError(f"eps {cfg['eps']} x eps_multiplier {cfg['eps_multiplier']} >= 1 would remove whole label "
                        "sets; lower one of them")


@register("spectral", "defense", paper="Tran et al., NeurIPS 2018", needs=("trained_model", "poisoned_train_set"),
          options=OPTIONS, summary="Spectral Signatures: remove each label's outliers along the top singular direction "
          "of its representations, retrain on the rest")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("spectral", OPTIONS, argv, __doc__, dataset=dataset)
    check_settings(cfg)
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    return run_filter("spectral", cfg, args, detect)


if __name__ == "__main__":
    run_main(main)
