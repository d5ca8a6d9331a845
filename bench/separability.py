"""Latent separability of poisoned vs clean training samples, for a list of attack records (bypass.md §7): does the
backdoor hide in feature space?

For each record, on eval-mode, un-augmented penultimate features M.features(x):
- the probe set: every poisoned training sample and an equal, seeded random number of clean training samples
  (poison indicator 0), split 50/50 (per kind, seeded);
- probe: a logistic regression (standardised features) fitted on one half, held-out accuracy and AUC on the other;
- post-hoc D: a fresh discriminator of Bypass's architecture trained after the fact on the same half (Adam),
  held-out AUC; what a defender with labels could reach;
- own D: a Bypass record's own discriminator on the held-out half, and its last-epoch test-set AUC (metrics.csv);
- target-class probe: the same logistic regression on poisoned vs clean samples that carry the target label
  (equal numbers, 50/50), the separation that clustering defenses such as activation clustering rely on;
- spectral: the spectral-signature score (Tran et al. 2018) on all training samples labelled with the target
  (all2one; every training sample for all2all): squared projection on the top singular vector of the centred
  features; its AUC for finding the poisoned ones, and the fraction of poisoned among the top 1.5 n_p scores.

    python bench/separability.py badnet_demo bypass_badnet_demo blend_demo bypass_blend_demo
"""
import argparse
import pathlib


import numpy as np
import torch
import torch.nn.functional as F

from attack.bypass import Discriminator, disc_scores, load_discriminator, penultimate_features
from utils.detection import roc_auc
from utils.errors import run_main
from utils.io import load_weights, read_csv_rows
from utils.record import load_attack_record
from utils.seeding import generator
from utils.engine.device import Precision, pick_device


def half_split(n_pos, n_neg, gen):
    """Boolean 'train half' masks over [positives, negatives], each kind split 50/50."""
    parts = []
    for n in (n_pos, n_neg):
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=gen)[: n // 2]] = True
        parts.append(m)
    return torch.cat(parts)


def linear_probe(h_tr, p_tr, h_te, p_te):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    sc = StandardScaler().fit(h_tr)
    clf = LogisticRegression(max_iter=2000).fit(sc.transform(h_tr), p_tr)
    prob = clf.predict_proba(sc.transform(h_te))[:, 1]
    return float((clf.predict(sc.transform(h_te)) == p_te).mean()), roc_auc(torch.from_numpy(prob), torch.from_numpy(p_te))


def posthoc_discriminator(h_tr, p_tr, h_te, p_te, seed, epochs=30):
    """Bypass's D architecture, trained after the fact (Adam 1e-3, BCE, batch 128) on fixed features."""
    torch.manual_seed(seed)
    d = Discriminator(h_tr.shape[1])
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    gen = generator(seed, "posthoc_discriminator")
    d.train()
    for _ in range(epochs):
        order = torch.randperm(len(h_tr), generator=gen)
        for i in range(0, len(order) - 1, 128):
            b = order[i:i + 128]
            if len(b) < 2:
                continue
            loss = F.binary_cross_entropy(d(h_tr[b]), p_tr[b].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return roc_auc(disc_scores(d, h_te), p_te)


def spectral_scores(h):
    c = h - h.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(c.double(), full_matrices=False)
    return (c.double() @ v[0]) ** 2


def last_metric(path, key):
    f = pathlib.Path(path) / "metrics.csv"
    if not f.exists():
        return float("nan")
    rows = read_csv_rows(f, "record file")
    v = rows[-1].get(key) if rows else None
    return float(v) if v not in (None, "") else float("nan")


def analyse(result_file, seed, precision, batch_size):
    rec = load_attack_record(result_file, device=precision.device)
    model, data = rec.model.to(precision.device), rec.data
    tr = data.train_indices
    ind = data.poison_indicator[tr]
    pois, clean_pool = tr[ind == 1], tr[ind == 0]
    gen = generator(seed, "separability")
    clean = clean_pool[torch.randperm(len(clean_pool), generator=gen)[: len(pois)]]
    idx = torch.cat([pois, clean])
    p = torch.cat([torch.ones(len(pois)), torch.zeros(len(clean))]).long()
    h = penultimate_features(model, data.x_train[idx].to(precision.device), precision, batch_size).cpu()
    m = half_split(len(pois), len(clean), gen)
    out = {"record": rec.path.name, "attack": rec.poison["attack"],
           "trigger": rec.poison["trigger"].get("bypass_trigger", {"patch": "badnet"}.get(rec.poison["trigger"]["kind"], rec.poison["trigger"]["kind"])),
           "test_acc": rec.summary["test_acc"], "test_asr": rec.summary["test_asr"], "n": len(idx)}
    out["probe_acc"], out["probe_auc"] = linear_probe(h[m].numpy(), p[m].numpy(), h[~m].numpy(), p[~m].numpy())
    out["posthoc_d_auc"] = posthoc_discriminator(h[m], p[m], h[~m], p[~m], seed)
    own = rec.path / "model.pt"
    if "discriminator_state_dict" in load_weights(own, "model file"):
        out["own_d_auc_train_heldout"] = roc_auc(disc_scores(load_discriminator(own), h[~m]), p[~m])
        out["own_d_auc_test"] = last_metric(rec.path, "disc_auc")
    else:
        out["own_d_auc_train_heldout"] = out["own_d_auc_test"] = float("nan")
    # spectral signature within the target class (what that defense inspects)
    if rec.poison["attack_label_trans"] == "all2one":
        group = tr[data.y_train[tr] == rec.poison["attack_target"]]
    else:
        group = tr
    hg = penultimate_features(model, data.x_train[group].to(precision.device), precision, batch_size).cpu()
    pg = data.poison_indicator[group]
    # probe within that group: poisoned vs clean samples carrying the same label (what clustering defenses face)
    pos, neg = torch.nonzero(pg == 1).flatten(), torch.nonzero(pg == 0).flatten()
    n = min(len(pos), len(neg))
    if n >= 4:
        pos, neg = pos[torch.randperm(len(pos), generator=gen)[:n]], neg[torch.randperm(len(neg), generator=gen)[:n]]
        hs, ps = torch.cat([hg[pos], hg[neg]]), torch.cat([torch.ones(n), torch.zeros(n)]).long()
        mt = half_split(n, n, gen)
        out["target_probe_acc"], out["target_probe_auc"] = linear_probe(hs[mt].numpy(), ps[mt].numpy(),
                                                                        hs[~mt].numpy(), ps[~mt].numpy())
    else:
        out["target_probe_acc"] = out["target_probe_auc"] = float("nan")
    s = spectral_scores(hg)
    k = min(len(s), int(1.5 * int(pg.sum())))
    out["spectral_auc"] = roc_auc(s, pg)
    out["spectral_top_precision"] = pg[s.argsort(descending=True)[:k]].float().mean().item()
    return out


COLUMNS = [("record", "record"), ("trigger", "trigger"), ("test_acc", "ACC"), ("test_asr", "ASR"),
           ("own_d_auc_test", "own D AUC (test)"), ("own_d_auc_train_heldout", "own D AUC (train, held-out)"),
           ("posthoc_d_auc", "post-hoc D AUC"), ("probe_acc", "linear probe acc"), ("probe_auc", "linear probe AUC"),
           ("target_probe_acc", "target-class probe acc"), ("target_probe_auc", "target-class probe AUC"),
           ("spectral_auc", "spectral AUC"), ("spectral_top_precision", "spectral top-1.5n precision")]


def markdown(rows):
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and v == v else ("-" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(n for _, n in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[k]) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+", help="attack records (names under record/ or paths)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="true", choices=("true", "false"))
    ap.add_argument("--batch_size", type=int, default=1024)
    a = ap.parse_args(argv)
    precision = Precision(pick_device(a.device), a.amp == "true", channels_last=False)
    np.random.seed(a.seed)
    rows = [analyse(r, a.seed, precision, a.batch_size) for r in a.records]
    print("\nPoisoned vs clean training samples on penultimate features (AUC 0.5 = inseparable; "
          "below 0.5 = inverted):\n")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    run_main(main)
