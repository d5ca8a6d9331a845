"""Activation Clustering (Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava, "Detecting Backdoor
Attacks on Deep Neural Networks by Activation Clustering", SafeAI@AAAI 2019, arXiv 1811.03728; spec:
docs/specs/ac.md).

A label whose training set holds poisoned samples splits in two in the attacked model's last hidden layer: the
poison activates the backdoor, the clean samples their own features. AC reduces each label's penultimate
activations to 10 independent components, splits them with 2-means, flags a cluster by the original's rule (by
default the smaller cluster of every label), and trains a fresh model on what is kept with the attack's recipe.

    python defense/ac.py --result_file badnet_demo

Project decisions (spec §7): the whole label at once (BackdoorBench clusters per batch), FastICA as the paper (its
PCA or its first-10-coordinates reduction as options), seeded restarts per label, fp32 un-augmented activations,
every rule evaluated and reported, the chosen one removes; a label's identical points or too few samples are kept
whole. The threshold-free score is one minus the relative size of a sample's cluster, ties broken by how far it lies
on the small cluster's side, so its ROC passes through every size rule's operating point.
"""
import warnings

import numpy as np
import torch

from utils.config import Opt, in_range
from utils.defense import defense_config
from utils.detection import at_threshold
from utils.errors import UserError, run_main
from utils.filtering import representations, run_filter
from utils.registry import register
from utils.retrain import recipe_override_options
from utils.seeding import derive_seed

RULES = ("smaller", "relative-size", "silhouette-scores", "distance")
OPTIONS = [
    Opt("nb_dims", int, 10, "components kept by the per-label reduction", check=in_range(1)),
    Opt("reduce", str, "FastICA", "FastICA (the paper), PCA (ART's class default), first (the first nb_dims raw "
        "coordinates: BackdoorBench's effective reduction), none", choices=("FastICA", "PCA", "first", "none")),
    Opt("nb_clusters", int, 2, "k of k-means (only 2: every rule but `smaller` is defined for two)"),
    Opt("cluster_analysis", str, "smaller", "the rule that removes (all are reported)", choices=RULES),
    Opt("size_threshold", float, 0.35, "relative-size limit of relative-size and silhouette-scores",
        check=in_range(0, 1)),
    Opt("silhouette_threshold", float, 0.10, "silhouette limit of silhouette-scores", check=in_range(-1, 1)),
    Opt("distance_space", str, "features", "where `distance` takes medians: raw features or the reduced space (ART)",
        choices=("features", "reduced")),
    Opt("kmeans_n_init", int, 10, "k-means restarts", check=in_range(1)),
    Opt("ica_max_iter", int, 1000, "FastICA iteration limit", check=in_range(1)),
    Opt("ica_tol", float, 0.005, "FastICA tolerance", check=in_range(0, lo_open=True)),
    Opt("min_class_size", int, None, "labels with fewer samples are kept whole (default nb_dims + 1)",
        check=in_range(2)),
    *recipe_override_options(),
]


# --- 1. one label: reduce, 2-means, cluster statistics ---------------------------------------------------------

def reduce(h: np.ndarray, cfg, seed: int):
    """The label's activations (float64) in nb_dims dimensions; constant columns (dead units) dropped first.
    Returns (z, ICA convergence warnings)."""
    h = h[:, h.max(0) > h.min(0)]
    k, how = cfg["nb_dims"], cfg["reduce"]
    if how == "none" or h.shape[1] <= k:
        return h, 0
    if how == "first":
        return h[:, :k], 0
    from sklearn.decomposition import PCA, FastICA
    if how == "PCA":
        return PCA(n_components=k).fit_transform(h), 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = FastICA(n_components=k, algorithm="parallel", whiten="unit-variance", fun="logcosh",
                    max_iter=cfg["ica_max_iter"], tol=cfg["ica_tol"], random_state=seed).fit_transform(h)
    if not np.isfinite(z).all():   # whitened PCA gives the same 2-means partition as ICA (spec §6.2)
        z = PCA(n_components=k, whiten=True).fit_transform(h)
    return z, sum("converge" in str(w.message).lower() for w in caught)


def cluster(z: np.ndarray, cfg, seed: int) -> dict:
    """2-means of one label: cluster of every sample, relative sizes, the smaller cluster (lower label on a tie),
    the mean silhouette, and the margin ||z - mu_big|| - ||z - mu_small|| (higher: deeper on the small side)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_samples
    km = KMeans(n_clusters=2, init="k-means++", n_init=cfg["kmeans_n_init"], max_iter=300, tol=1e-4,
                algorithm="lloyd", random_state=seed).fit(z)
    k = km.labels_.astype(np.int64)
    sizes = np.bincount(k, minlength=2)
    if (sizes == 0).any():
        return {"status": "single_cluster"}
    small = int(np.argmin(sizes))
    mu = km.cluster_centers_
    margin = np.linalg.norm(z - mu[1 - small], axis=1) - np.linalg.norm(z - mu[small], axis=1)
    return {"status": "clustered", "k": k, "rel": sizes / len(k), "small": small,
            "sil": float(silhouette_samples(z, k).mean()), "margin": margin}


# --- 2. the rules ------------------------------------------------------------------------------------------------

def size_flags(c: dict, threshold: float) -> np.ndarray:
    return np.round(c["rel"][c["k"]], 2) < round(threshold, 2)


def rule_flags(rule, c, cfg, label_of_cluster_flagged=None) -> np.ndarray:
    """Flags of one clustered label under a rule (`distance` is decided across labels: its per-cluster verdict is
    passed in)."""
    if rule == "smaller":
        return c["k"] == c["small"]
    if rule == "relative-size":
        return size_flags(c, cfg["size_threshold"])
    if rule == "silhouette-scores":
        return size_flags(c, cfg["size_threshold"]) & (round(c["sil"], 4) > round(cfg["silhouette_threshold"], 4))
    return label_of_cluster_flagged[c["k"]]


def distance_verdicts(space: dict, clusters: dict) -> dict:
    """ART's distance rule: cluster j of label c is flagged when its median is nearer some other label's median
    than its own label's while its sibling's is not. space[c]: the label's points (features or reduced)."""
    medians = {c: np.median(p, axis=0) for c, p in space.items()}
    out = {}
    for c, cl in clusters.items():
        if cl["status"] != "clustered":
            continue
        nu = [np.median(space[c][cl["k"] == j], axis=0) for j in (0, 1)]
        own = [np.linalg.norm(nu[j] - medians[c]) for j in (0, 1)]
        flagged = np.zeros(2, dtype=bool)
        for j in (0, 1):
            for other, m in medians.items():
                if other != c and len(m) == len(nu[j]) and np.linalg.norm(nu[j] - m) < own[j] and \
                        np.linalg.norm(nu[1 - j] - m) > own[1 - j]:
                    flagged[j] = True
        out[c] = flagged
    return out


def lexicographic_score(primary: np.ndarray, secondary: np.ndarray) -> torch.Tensor:
    """The dense rank of (primary, secondary), ascending: one number per sample that orders samples as the pair
    does and keeps exact ties tied."""
    order = np.lexsort((secondary, primary))
    p, s = primary[order], secondary[order]
    new = np.concatenate([[True], (p[1:] != p[:-1]) | (s[1:] != s[:-1])])
    rank = np.empty(len(order), dtype=np.float64)
    rank[order] = np.cumsum(new)
    return torch.from_numpy(rank)


# --- 3. every label ------------------------------------------------------------------------------------------------

def detect(ctx, model):
    cfg, data = ctx.cfg, ctx.data
    tr = data.train_indices
    labels = data.y_train[tr].numpy()
    h = representations(model, data.x_train[tr].to(ctx.device), "features", cfg["eval_batch_size"]).double().numpy()
    if h.shape[1] <= 32:
        print(f"ac: warning: only {h.shape[1]} activations per sample")
    n, min_size = len(tr), cfg["min_class_size"] or cfg["nb_dims"] + 1
    rel, margin = np.ones(n), np.zeros(n)
    clusters, reduced, rows = {}, {}, []
    for c in range(data.num_classes):
        pos = np.nonzero(labels == c)[0]
        if len(pos) == 0:
            continue
        if len(pos) < min_size:
            clusters[c] = {"status": "too_small"}
        else:
            z, unconverged = reduce(h[pos], cfg, derive_seed(cfg["random_seed"], f"ac_ica_{c}") % 2 ** 32)
            clusters[c] = {**cluster(z, cfg, derive_seed(cfg["random_seed"], f"ac_kmeans_{c}") % 2 ** 32),
                           "ica_unconverged": unconverged}
            reduced[c] = z
        cl, p = clusters[c], data.poison_indicator[tr[pos]].numpy().astype(bool)
        if cl["status"] == "clustered":
            rel[pos], margin[pos] = cl["rel"][cl["k"]], cl["margin"]
        small = cl.get("k", np.zeros(0)) == cl.get("small")
        rows.append({"label": c, "n": len(pos), "n_poisoned": int(p.sum()), "status": cl["status"],
                     "smaller_size": int(small.sum()) if cl["status"] == "clustered" else 0,
                     "smaller_poisoned": int((small & p).sum()) if cl["status"] == "clustered" else 0,
                     "silhouette": cl.get("sil", float("nan")), "ica_unconverged": cl.get("ica_unconverged", 0)})
    space = {c: h[labels == c] for c in clusters} if cfg["distance_space"] == "features" else reduced
    verdicts = distance_verdicts(space, {c: cl for c, cl in clusters.items() if c in space})
    poisoned = data.poison_indicator[tr].bool()
    flags, extras = {}, {}
    for rule in RULES:
        f = np.zeros(n, dtype=bool)
        for c, cl in clusters.items():
            if cl["status"] == "clustered" and (rule != "distance" or c in verdicts):
                f[labels == c] = rule_flags(rule, cl, cfg, verdicts.get(c))
        flags[rule] = torch.from_numpy(f)
        extras.update({f"{rule}_{k}": v for k, v in at_threshold(flags[rule], poisoned).items()})
    for r in rows:
        r["removed"] = int(flags[cfg["cluster_analysis"]][torch.from_numpy(labels == r["label"])].sum())
    ctx.run.write_file("clusters.csv", ",".join(rows[0]) + "\n" + "".join(
        ",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r.values()) + "\n" for r in rows))
    emptied = [r["label"] for r in rows if r["removed"] == r["n"]]
    if emptied:
        print(f"ac: warning: every sample of label(s) {emptied} is removed")
    return flags[cfg["cluster_analysis"]], lexicographic_score(1 - rel, margin), extras


def check_settings(cfg):
    if cfg["nb_clusters"] != 2:
        raise UserError(f"--nb_clusters {cfg['nb_clusters']}: only 2 is supported (the rules other than `smaller` "
                        "are defined for two clusters, as the paper's)")


@register("ac", "defense", paper="Chen et al., SafeAI@AAAI 2019", needs=("trained_model", "poisoned_train_set"),
          options=OPTIONS, summary="Activation Clustering: 2-means of each label's reduced penultimate activations, "
          "remove the flagged cluster, retrain on the rest")
def configure(argv=None, dataset=None):
    """Every setting resolved and checked, nothing written (the sweep checks its jobs with this)."""
    cfg, args = defense_config("ac", OPTIONS, argv, __doc__, dataset=dataset)
    check_settings(cfg)
    return cfg, args


def main(argv=None):
    cfg, args = configure(argv)
    return run_filter("ac", cfg, args, detect)


if __name__ == "__main__":
    run_main(main)
